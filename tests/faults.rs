//! Whole-pipeline faults: the five services as separate processes (as in the stack), a real
//! `nats-server`, the S3 server, the local forge or the fake GitLab, DCMTK's `storescu` as the
//! scanners and DataLad as the oracle. Faults: SIGKILL of each service and of `nats-server`, S3
//! and GitLab outages and error bursts, a full spool file system, busy scanners with amendments
//! and a resend, real-world and hostile metadata. Each scenario ends with every study indexed
//! exactly once per generation, `datalad get` giving back every data set byte for byte, no dead
//! letter but the expected ones, and no spool or work file left behind. Figures and what they
//! mean: `docs/reliability.md`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bidsflux_fake_gitlab::FakeGitlab;
use bidsflux_messaging::{Bus, subjects as s};
use bidsflux_proto::v1 as pb;
use bidsflux_testsupport::dicom::{GeneratedStudy, StudySpec, generate_study};
use bidsflux_testsupport::site::{Service, Site, SiteOptions};
use bidsflux_testsupport::wait_until;
use common::{SiteView, all, count, send, send_until_accepted};

/// `n` studies of one PI and study, each its own participant, `instances` instances each.
fn studies(dir: &Path, n: usize, instances: usize) -> Vec<(PathBuf, GeneratedStudy)> {
    (0..n)
        .map(|i| {
            let spec = StudySpec {
                series: 2,
                instances_per_series: instances / 2,
                patient_name: format!("sub-{i:02}^ses-1"),
                patient_id: format!("SUB{i:02}"),
                ..StudySpec::default()
            };
            study(&dir.join(format!("study-{i}")), &spec)
        })
        .collect()
}

/// One study of `spec` written under `dir`.
fn study(dir: &Path, spec: &StudySpec) -> (PathBuf, GeneratedStudy) {
    (dir.to_path_buf(), generate_study(dir, spec).unwrap())
}

/// Sends a transfer that must be refused (the sender sees a failure status); its output.
async fn send_refused(port: u16, dir: &Path) -> String {
    let out = tokio::process::Command::new("/usr/bin/storescu")
        .args(["-v", "-aec", "BIDSFLUX", "127.0.0.1", &port.to_string(), "+sd", "+r", "-to", "10", "-ta", "10"])
        .arg(dir)
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "the transfer of {} was accepted:\n{text}", dir.display());
    text
}

/// Waits until `stream` holds at least `n` messages.
async fn at_least(bus: &Bus, stream: &str, n: u64, site: &Site) {
    wait_until(&format!("{n} messages on {stream}"), Duration::from_secs(120), || async {
        (count(bus, stream).await >= n).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log_tails(15)));
}

/// Waits until a message of `stream`, decoded as `M`, is about `study` (by `uid`).
async fn study_on<M: prost::Message + Default>(
    bus: &Bus,
    stream: &str,
    study: &str,
    uid: impl Fn(&M) -> &str,
    site: &Site,
) {
    wait_until(&format!("{study} on {stream}"), Duration::from_secs(120), || async {
        all::<M>(bus, stream).await.iter().any(|m| uid(m) == study).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log_tails(15)));
}

/// Starts a site with `settings` on top of the defaults, `indexers` replicas and `options`, and
/// a bus client to read its streams.
async fn start(settings: &[(&str, &str)], indexers: usize, options: &SiteOptions) -> (Site, Bus) {
    bidsflux_telemetry::init_for_tests();
    let site = Site::start_with(settings, indexers, options).await.unwrap();
    let bus = Bus::connect(&site.nats.url, "faults", Duration::from_secs(5)).await.unwrap();
    (site, bus)
}

/// A fake GitLab set up by `bidsflux-provisioner` as a site sets up its GitLab (`secrets`,
/// `gitlab`, `runners` with the administrator's token, secrets in a directory), and the settings
/// that make a site index into it with the `dicom_bot` token the provisioner made. The directory
/// of secrets lives as long as the returned guard.
async fn fake_gitlab() -> (FakeGitlab, Vec<(&'static str, String)>, tempfile::TempDir) {
    let fake = FakeGitlab::start().await.unwrap();
    let ssh = fake.start_ssh().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let admin = dir.path().join("admin-token");
    let keep = dir.path().join("keep");
    std::fs::write(&admin, fake.admin_token()).unwrap();
    let bin = bidsflux_testsupport::site::bin_dir().unwrap().join("bidsflux-provisioner");
    for command in ["secrets", "gitlab", "runners"] {
        let mut args = vec![command, "--secrets-dir", secrets.to_str().unwrap()];
        if command == "secrets" {
            args.extend(["--reveal-to", keep.to_str().unwrap()]);
        } else {
            args.extend(["--gitlab-token-file", admin.to_str().unwrap()]);
        }
        common::run_ok(
            std::process::Command::new(&bin)
                .args(&args)
                .env("GITLAB_URL", fake.url())
                .env("GITLAB_BOT_EMAIL", "dicom_bot@example.org")
                .env("BIDSFLUX_GITLAB_SSH_HOST", "127.0.0.1")
                .env("GIT_SSH_PORT", ssh.port.to_string())
                .env("OTEL_SDK_DISABLED", "true"),
        );
    }
    drop(ssh);
    // `secrets` made a placeholder for the first deploy; `gitlab` the token, as its next version.
    let token = secrets.join("dicom_bot_gitlab_token_v2");
    let bot = fake.user("dicom_bot").expect("the provisioner made dicom_bot");
    let value = std::fs::read_to_string(&token).unwrap();
    assert!(
        fake.tokens().iter().any(|t| t.user_id == bot.id && !t.revoked && t.token == value),
        "the stored token is dicom_bot's active token"
    );
    let settings = vec![
        ("BIDSFLUX_FORGE", "gitlab".to_owned()),
        ("GITLAB_URL", fake.url()),
        ("GITLAB_TOKEN_FILE", token.display().to_string()),
        ("GITLAB_BOT_USERNAME", "dicom_bot".to_owned()),
    ];
    (fake, settings, dir)
}

/// `settings` borrowed as [`start`] takes them.
fn borrowed<'a>(settings: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    settings.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Where the session datasets are pushed.
#[derive(Clone, Copy)]
enum Forge<'a> {
    /// Bare repositories under the site's forge directory.
    Local,
    /// The fake GitLab's repositories.
    Gitlab(&'a FakeGitlab),
}

impl Forge<'_> {
    /// The bare repository of `project`.
    fn repo(self, site: &Site, project: &str) -> PathBuf {
        match self {
            Self::Local => site.forge().join(format!("{project}.git")),
            Self::Gitlab(fake) => fake.repo_dir(project).unwrap_or_else(|| panic!("no project {project} in GitLab")),
        }
    }
}

/// [`common::check_end_state`] on this site, then what only a site of processes shows: each
/// process's claimed scratch directory holds its lock only (a killed one's is removed by its
/// successor), and every service still runs.
async fn check_end_state(
    scenario: &str,
    site: &mut Site,
    bus: &Bus,
    forge: Forge<'_>,
    sent: &[(PathBuf, GeneratedStudy)],
    dead: &[(PathBuf, GeneratedStudy)],
) {
    {
        let site: &Site = site;
        let view = SiteView {
            bus,
            repo: &|project| forge.repo(site, project),
            clones: site.dir.path().join("clones"),
            annex_env: site.s3.annex_user_env().to_vec(),
            spool: site.spool(),
            work: site.work(),
            logs: &|| site.log_tails(15),
        };
        common::check_end_state(scenario, &view, sent, dead).await;
    }
    for process in std::fs::read_dir(site.work()).unwrap() {
        let process = process.unwrap().path();
        let claims = std::fs::read_dir(&process).unwrap().count();
        assert!(claims <= 1, "{}: {claims} claims, a killed process's was not removed", process.display());
    }
    for s in Service::ALL {
        assert!(site.is_running(s, 0), "{s:?} stopped\n{}", site.log_tails(15));
    }
}

/// kill -9 of each service in turn at a point of the flow where it holds work, then a restart;
/// the provisioner re-run mid-flow. The scanners resend a transfer the receiver's death broke.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_killed_in_turn_loses_nothing_and_indexes_once() {
    let (mut site, bus) = start(&[], 3, &SiteOptions::default()).await;
    let sent = studies(&site.dir.path().join("sent"), 3, 40);
    let port = site.dicom_port;

    // The receiver dies while the first study arrives; the scanner resends it.
    let dir0 = sent[0].0.clone();
    let first = tokio::spawn(async move { send(port, &dir0).await.is_ok() });
    wait_until("some instances stored", Duration::from_secs(30), || async {
        (count(&bus, s::STREAM_INSTANCES).await >= 10).then_some(())
    })
    .await
    .unwrap();
    site.kill(Service::Receiver, 0).await.unwrap();
    let _ = first.await;
    site.spawn(Service::Receiver, 0).unwrap();
    site.wait_for_dicom().await.unwrap();
    send_until_accepted(port, &sent[0].0).await;

    // Study-completion dies during the quiet period of the first study.
    site.kill(Service::StudyCompletion, 0).await.unwrap();
    site.spawn(Service::StudyCompletion, 0).unwrap();
    // The provisioner runs again while everything flows: it changes nothing.
    site.provision().await.unwrap();

    // The other two studies at once; the uploader dies once a completion waits for it.
    let (a, b) = (sent[1].0.clone(), sent[2].0.clone());
    let scanners =
        tokio::spawn(async move { tokio::join!(send_until_accepted(port, &a), send_until_accepted(port, &b)) });
    wait_until("a completion", Duration::from_secs(60), || async {
        (count(&bus, s::STREAM_STUDIES).await >= 1).then_some(())
    })
    .await
    .unwrap();
    site.kill(Service::Uploader, 0).await.unwrap();
    site.spawn(Service::Uploader, 0).unwrap();
    // One of three indexer replicas dies once an archive waits for indexing.
    wait_until("an archive", Duration::from_secs(120), || async {
        (count(&bus, s::STREAM_ARCHIVES).await >= 1).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", site.log_tails(15)));
    site.kill(Service::Indexer, 0).await.unwrap();
    site.spawn(Service::Indexer, 0).unwrap();
    scanners.await.unwrap();

    check_end_state("kill -9 of each service", &mut site, &bus, Forge::Local, &sent, &[]).await;
}

/// `nats-server` killed and restarted on the same store while studies flow: the receiver keeps
/// its journal's events and publishes them again, the consumers resume, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_killed_and_restarted_mid_flow_loses_nothing() {
    let (mut site, bus) = start(&[], 2, &SiteOptions::default()).await;
    let sent = studies(&site.dir.path().join("sent"), 2, 40);
    let port = site.dicom_port;
    send_until_accepted(port, &sent[0].0).await;
    // The bus goes down after the first study's instances were published, before its completion.
    site.nats.stop().await.unwrap();
    // The second study arrives while the bus is down: accepted into the journal, or refused
    // with 0xA700 and resent by the scanner once the bus is back.
    let second = send(port, &sent[1].0).await.is_ok();
    site.nats.restart().await.unwrap();
    if !second {
        send_until_accepted(port, &sent[1].0).await;
    }
    check_end_state("nats-server killed and restarted", &mut site, &bus, Forge::Local, &sent, &[]).await;
}

/// S3 unreachable for 30 s while archives are uploaded, then answering 503 (`ServiceUnavailable`)
/// for 20 s while another completes: the uploader retries until S3 is back; nothing is
/// dead-lettered and nothing is deleted before it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_unreachable_then_answering_503_loses_nothing() {
    let (mut site, bus) = start(&[], 1, &SiteOptions::default()).await;
    let sent = studies(&site.dir.path().join("sent"), 3, 40);
    let port = site.dicom_port;
    // S3 goes away before the first study completes; the second arrives during the outage.
    send_until_accepted(port, &sent[0].0).await;
    site.s3.stop();
    let outage = tokio::time::Instant::now();
    send_until_accepted(port, &sent[1].0).await;
    at_least(&bus, s::STREAM_STUDIES, 2, &site).await;
    tokio::time::sleep_until(outage + Duration::from_secs(30)).await;
    assert_eq!(count(&bus, s::STREAM_ARCHIVES).await, 0, "nothing can be archived while S3 is away");
    site.s3.restart().await.unwrap();
    // Then S3 answers but refuses to serve: 503 to every request for 20 s.
    site.s3.fail_requests(Some(503));
    let failing = tokio::time::Instant::now();
    send_until_accepted(port, &sent[2].0).await;
    at_least(&bus, s::STREAM_STUDIES, 3, &site).await;
    tokio::time::sleep_until(failing + Duration::from_secs(20)).await;
    site.s3.fail_requests(None);
    check_end_state("S3 unreachable 30 s, then 503 for 20 s", &mut site, &bus, Forge::Local, &sent, &[]).await;
}

/// GitLab answers 5xx in bursts (REST API and git pushes), then is down for 60 s while
/// sessions wait to be indexed: the indexers retry until it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gitlab_5xx_bursts_and_a_60_s_outage_lose_nothing() {
    let (fake, mut gitlab, _secrets) = fake_gitlab().await;
    gitlab.push(("BIDSFLUX_GITLAB_TIMEOUT", "10s".to_owned()));
    let (mut site, bus) = start(&borrowed(&gitlab), 2, &SiteOptions::default()).await;
    let sent = studies(&site.dir.path().join("sent"), 4, 40);
    let port = site.dicom_port;
    // Bursts: the next API requests fail with 502 and 500, the next pushes with 503.
    fake.fail_next(None, "/api/v4/", 502, 4);
    fake.fail_next(None, "/api/v4/", 500, 2);
    fake.fail_next(Some("POST"), "/Investigator/", 503, 2);
    let (a, b) = (sent[0].0.clone(), sent[1].0.clone());
    tokio::join!(send_until_accepted(port, &a), send_until_accepted(port, &b));
    at_least(&bus, s::STREAM_INDEXED, 2, &site).await;
    // The outage: connections refused for 60 s while two more studies are archived.
    fake.stop();
    let outage = tokio::time::Instant::now();
    let (c, d) = (sent[2].0.clone(), sent[3].0.clone());
    tokio::join!(send_until_accepted(port, &c), send_until_accepted(port, &d));
    at_least(&bus, s::STREAM_ARCHIVES, 4, &site).await;
    tokio::time::sleep_until(outage + Duration::from_secs(60)).await;
    assert_eq!(count(&bus, s::STREAM_INDEXED).await, 2, "nothing can be indexed while GitLab is down");
    fake.restart().await.unwrap();
    check_end_state("GitLab 5xx bursts and a 60 s outage", &mut site, &bus, Forge::Gitlab(&fake), &sent, &[]).await;
    let failed = fake.request_log().iter().filter(|r| r.status >= 500).count();
    assert!(failed >= 8, "the bursts were served: {failed} 5xx answers");
}

/// The spool's file system full (a 64 MiB tmpfs of its own, filled): the scanner gets 0xA700
/// (Out of Resources); once space is freed, its resend is accepted and the study indexed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_spool_refuses_with_a700_then_recovers() {
    // No free-space reserve: the file system itself runs out.
    let options = SiteOptions { spool_fs_bytes: Some(64 << 20) };
    let (mut site, bus) = start(&[("BIDSFLUX_SPOOL_MIN_FREE", "0")], 1, &options).await;
    let sent = studies(&site.dir.path().join("sent"), 2, 40);
    let port = site.dicom_port;
    send_until_accepted(port, &sent[0].0).await;
    // Fill the file system to the last byte.
    let filler = site.spool().join(".filler");
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xA5u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let small = [0u8; 512];
        while f.write_all(&small).is_ok() {}
        let _ = f.sync_all();
    }
    let refused = send_refused(port, &sent[1].0).await;
    let lower = refused.to_ascii_lowercase().replace(' ', "");
    assert!(lower.contains("a700") || lower.contains("outofresources"), "not refused with 0xA700:\n{refused}");
    // The receiver is still up, and answers again once space is freed.
    assert!(site.wait_for_dicom().await.is_ok());
    std::fs::remove_file(&filler).unwrap();
    send_until_accepted(port, &sent[1].0).await;
    check_end_state("spool file system full", &mut site, &bus, Forge::Local, &sent, &[]).await;
}

/// Four scanners send three studies each at once; two studies get a late series after they
/// were completed (amendments: generation 1), and a study is sent again after it was indexed
/// (a resend: nothing new, nothing left in the spool).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_busy_scanners_with_amendments_and_a_resend() {
    let (mut site, bus) = start(&[], 2, &SiteOptions::default()).await;
    let dir = site.dir.path().join("sent");
    let mut sent: Vec<(PathBuf, GeneratedStudy)> = (0..12)
        .map(|i| {
            let spec = StudySpec {
                series: 2,
                instances_per_series: 10,
                patient_name: format!("sub-{i:02}^ses-1"),
                patient_id: format!("SUB{i:02}"),
                referring_physician_name: format!("Scanner{}PI", i % 4),
                ..StudySpec::default()
            };
            study(&dir.join(format!("study-{i}")), &spec)
        })
        .collect();
    let port = site.dicom_port;
    let scanners: Vec<_> = (0..4)
        .map(|scanner| {
            let mine: Vec<PathBuf> = (0..3).map(|k| sent[scanner + 4 * k].0.clone()).collect();
            tokio::spawn(async move {
                for d in mine {
                    send_until_accepted(port, &d).await;
                }
            })
        })
        .collect();
    // Late series: as soon as studies 0 and 1 are completed, another series of each arrives.
    for i in [0, 1] {
        let uid = sent[i].1.study_instance_uid.clone();
        study_on::<pb::StudyCompleted>(&bus, s::STREAM_STUDIES, &uid, |c| &c.study_instance_uid, &site).await;
        let spec = StudySpec {
            series: 1,
            instances_per_series: 10,
            patient_name: format!("sub-{i:02}^ses-1"),
            patient_id: format!("SUB{i:02}"),
            referring_physician_name: format!("Scanner{}PI", i % 4),
            study_instance_uid: Some(uid),
            ..StudySpec::default()
        };
        let (late_dir, late) = study(&dir.join(format!("study-{i}-late")), &spec);
        send_until_accepted(port, &late_dir).await;
        sent[i].1.files.extend(late.files);
    }
    for t in scanners {
        t.await.unwrap();
    }
    // A resend of study 2 once it is indexed: its instances are known, nothing is redone.
    let uid = sent[2].1.study_instance_uid.clone();
    study_on::<pb::StudyIndexed>(&bus, s::STREAM_INDEXED, &uid, |e| &e.study_instance_uid, &site).await;
    send_until_accepted(port, &sent[2].0).await;
    check_end_state("4 scanners × 3 studies, 2 amendments, 1 resend", &mut site, &bus, Forge::Local, &sent, &[]).await;
    let completed: Vec<pb::StudyCompleted> = all(&bus, s::STREAM_STUDIES).await;
    for (i, want) in [(0, 2), (1, 2), (2, 1)] {
        let n = completed.iter().filter(|c| c.study_instance_uid == sent[i].1.study_instance_uid).count();
        assert_eq!(n, want, "study {i}: generations");
    }
}

/// Real-world and hostile metadata through the whole pipeline, on the fake GitLab: person names
/// with `^` in every templated tag, unicode, values at their VR's maximum length go through to
/// the original's layout; a missing StudyDescription and a `..` name are refused with a clear
/// dead letter, their instances kept in the spool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_world_names_go_through_and_hostile_ones_are_dead_lettered_keeping_the_data() {
    let (fake, gitlab, _secrets) = fake_gitlab().await;
    let (mut site, bus) = start(&borrowed(&gitlab), 1, &SiteOptions::default()).await;
    let dir = site.dir.path().join("sent");
    let spec = |i: usize, referring: &str, description: &str, patient: &str| StudySpec {
        series: 2,
        instances_per_series: 5,
        patient_name: patient.to_owned(),
        patient_id: format!("SUB{i:02}"),
        referring_physician_name: referring.to_owned(),
        study_description: description.to_owned(),
        ..StudySpec::default()
    };
    // PN and LO hold 64 characters (PS3.5 6.2): a long PI name and description.
    let long_pi = "Vanderberg-Lindqvist^Anna-Maria Christina^^Prof.^PhD";
    let long_description = "Neuroimaging^Longitudinal memory consolidation study, cohort A";
    assert!(long_pi.chars().count() <= 64 && long_description.chars().count() <= 64);
    let good = vec![
        study(&dir.join("names"), &spec(0, "Smith^John", "Brain^Study1", "Doe^Jane")),
        study(&dir.join("unicode"), &spec(1, "Müller^Jürgen", "Cerveau^Étude été", "Øster^Åsa")),
        study(&dir.join("long"), &spec(2, long_pi, long_description, "Doe^John^Q^Mr^Jr")),
    ];
    let bad = vec![
        study(&dir.join("no-description"), &spec(3, "Smith^John", "", "Doe^Jim")),
        study(&dir.join("dot-dot"), &spec(4, "..^John", "Brain^Study1", "Doe^Joe")),
    ];
    for (d, _) in good.iter().chain(&bad) {
        send_until_accepted(site.dicom_port, d).await;
    }
    check_end_state("real-world and hostile metadata", &mut site, &bus, Forge::Gitlab(&fake), &good, &bad).await;
    // The original's layout: `^` is `/`, nested groups under the PI's family and given names.
    let indexed: Vec<pb::StudyIndexed> = all(&bus, s::STREAM_INDEXED).await;
    let project = |g: &GeneratedStudy| {
        indexed.iter().find(|e| e.study_instance_uid == g.study_instance_uid).unwrap().project_path.clone()
    };
    assert_eq!(project(&good[0].1), format!("Smith/John/Study1/sourcedata/dicoms/{}", good[0].1.study_instance_uid));
    assert!(fake.group("Smith/John/Study1").is_some(), "nested groups {:?}", fake.groups());
    // Unicode and spaces, which GitLab refuses in a path, written as it accepts them.
    assert_eq!(
        project(&good[1].1),
        format!("Muller/Jurgen/Etude-ete/sourcedata/dicoms/{}", good[1].1.study_instance_uid)
    );
    // Dead letters say why, without the value (patient data may be in it).
    let dead: Vec<pb::DeadLetter> = all(&bus, s::STREAM_DEADLETTER).await;
    for d in &dead {
        assert!(!d.reason.contains("Doe"), "{}", d.reason);
    }
    let why =
        |g: &GeneratedStudy| dead.iter().find(|d| d.study_instance_uid == g.study_instance_uid).unwrap().reason.clone();
    assert!(why(&bad[0].1).contains("StudyDescription"), "{}", why(&bad[0].1));
    assert!(why(&bad[1].1).contains("ReferringPhysicianName"), "{}", why(&bad[1].1));
}
