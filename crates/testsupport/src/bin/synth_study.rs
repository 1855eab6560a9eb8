//! Writes a synthetic MR study for trying bidsflux:
//! `bidsflux-synth-study DIR [SERIES] [INSTANCES_PER_SERIES]`.

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: bidsflux-synth-study DIR [SERIES] [INSTANCES_PER_SERIES]"))?;
    let mut spec = bidsflux_testsupport::dicom::StudySpec::default();
    if let Some(s) = args.next() {
        spec.series = s.parse()?;
    }
    if let Some(n) = args.next() {
        spec.instances_per_series = n.parse()?;
    }
    let study = bidsflux_testsupport::dicom::generate_study(std::path::Path::new(&dir), &spec)?;
    println!("{} files, StudyInstanceUID {}", study.files.len(), study.study_instance_uid);
    Ok(())
}
