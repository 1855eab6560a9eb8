//! What the end-to-end tests share: reading a stream whole, and DataLad as the oracle.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull};
use bidsflux_messaging::Bus;
use bidsflux_testsupport::dicom::{dataset_bytes, sop_instance_uid};
use futures::StreamExt as _;

/// Every message on a stream, with its headers.
pub async fn messages(bus: &Bus, stream: &str) -> Vec<async_nats::jetstream::Message> {
    let st = bus.js.get_stream(stream).await.unwrap();
    let c = st
        .create_consumer(pull::Config { deliver_policy: consumer::DeliverPolicy::All, ..Default::default() })
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut batch = c.fetch().max_messages(10_000).expires(Duration::from_millis(300)).messages().await.unwrap();
    while let Some(Ok(m)) = batch.next().await {
        out.push(m);
    }
    out
}

/// The payloads of `msgs`, decoded.
pub fn decode<M: prost::Message + Default>(msgs: &[async_nats::jetstream::Message]) -> Vec<M> {
    msgs.iter().map(|m| M::decode(m.payload.as_ref()).unwrap()).collect()
}

/// `datalad clone` of the dataset `bare` into `clone` and `datalad get` of everything (with
/// `env` for git-annex's S3 remote); then every file of `sent` must be in it with the same data
/// set bytes, and nothing else.
pub fn assert_datalad_gets_every_instance(bare: &Path, clone: &Path, env: &[(&str, String)], sent: &[PathBuf]) {
    let run = |cmd: &mut Command| {
        let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    };
    let env = || env.iter().map(|(k, v)| (*k, v.as_str()));
    run(Command::new("datalad").envs(env()).arg("clone").arg(bare).arg(clone));
    run(Command::new("datalad").envs(env()).current_dir(clone).args(["get", "."]));
    let mut got: HashMap<String, PathBuf> = HashMap::new();
    for entry in walkdir::WalkDir::new(clone).into_iter().filter_entry(|e| e.file_name() != ".git") {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(sop) = name.strip_suffix(".dcm") {
            got.insert(sop.to_owned(), entry.path().to_path_buf());
        }
    }
    assert_eq!(got.len(), sent.len(), "DICOM files in the dataset {}: {got:?}", bare.display());
    for f in sent {
        let sop = sop_instance_uid(f).unwrap();
        let mine = got.get(&sop).unwrap_or_else(|| panic!("{sop} not in the dataset"));
        assert_eq!(dataset_bytes(mine).unwrap(), dataset_bytes(f).unwrap(), "data set bytes differ for {sop}");
    }
}
