//! Writes a synthetic MR study for trying bidsflux:
//! `bidsflux-synth-study DIR [SERIES] [INSTANCES_PER_SERIES] [ROWS] [COLUMNS]`
//! (images are 16-bit; ROWS and COLUMNS default to 64, COLUMNS to ROWS).

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
    let study = bidsflux_testsupport::dicom::generate_study(std::path::Path::new(&dir), &spec)?;
    println!("{} files, StudyInstanceUID {}", study.files.len(), study.study_instance_uid);
    Ok(())
}
