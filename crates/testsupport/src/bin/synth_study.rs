//! Writes a synthetic MR study for trying bidsflux:
//! `bidsflux-synth-study DIR [SERIES] [INSTANCES_PER_SERIES] [ROWS] [COLUMNS]`
//! (images are 16-bit; ROWS and COLUMNS default to 64, COLUMNS to ROWS).
//! Each study is another participant (PatientName `sub-<n>^ses-1`, ReproIn
//! style), so each becomes its own subdataset of the study superdataset.

const USAGE: &str = "usage: bidsflux-synth-study DIR [SERIES] [INSTANCES_PER_SERIES] [ROWS] [COLUMNS]";

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().ok_or_else(|| anyhow::anyhow!(USAGE))?;
    let mut spec = bidsflux_testsupport::dicom::StudySpec::default();
    if let Some(s) = args.next() {
        spec.series = s.parse()?;
    }
    if let Some(n) = args.next() {
        spec.instances_per_series = n.parse()?;
    }
    if let Some(rows) = args.next() {
        spec.rows = rows.parse()?;
        spec.columns = spec.rows;
    }
    if let Some(columns) = args.next() {
        spec.columns = columns.parse()?;
    }
    let participant = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() % 100_000;
    spec.patient_name = format!("sub-{participant:05}^ses-1");
    spec.patient_id = format!("SUB{participant:05}");
    let study = bidsflux_testsupport::dicom::generate_study(std::path::Path::new(&dir), &spec)?;
    println!(
        "{} files, StudyInstanceUID {}, PatientName {}",
        study.files.len(),
        study.study_instance_uid,
        spec.patient_name
    );
    Ok(())
}
