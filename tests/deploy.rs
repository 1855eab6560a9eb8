//! The swarm stack, deployed for real: a Docker Engine of the test's own (Debian's `docker.io`,
//! its own data root, exec root and socket), a one-node swarm on 127.0.0.1 labelled as both the
//! data and the processing server, the images built without any registry
//! (`stack/build-images.sh`: debootstrap + `docker import`, then `stack/Dockerfile` with the
//! binaries cargo built for this test), the secrets created through the Engine API, and
//! `docker stack deploy -c stack/bidsflux-stack.yml -c tests/deploy/override.yml`. The override
//! only adapts what this machine cannot do (it says why, line by line).
//!
//! Then, as a site uses it: every service reaches its replicas and reports healthy; a study sent
//! with DCMTK's `storescu` to the published DICOM port comes back byte for byte from `datalad
//! clone` + `datalad get -r`; `docker service scale bidsflux_indexer=3` and two more studies, all
//! indexed exactly once; `docker service update --force bidsflux_receiver` while a study is being
//! sent, and nothing is lost (the scanner resends what got no Success). At the end, pass or fail,
//! the stack is removed, the swarm left, the daemon stopped, and what it changed on the host
//! (iptables/nftables, `ip_forward`, links, `/var/lib/docker/network/files`) put back.
//!
//! Needs root (dockerd, debootstrap), as the fault suite's tmpfs does.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bidsflux_messaging::{Bus, subjects as s};
use bidsflux_testsupport::dicom::{GeneratedStudy, StudySpec, generate_study};
use bidsflux_testsupport::{free_port, wait_until};
use common::engine::{Engine, repo};
use common::{SiteView, check_end_state, count, run_ok, send, send_until_accepted_within};

impl Engine {
    /// `docker service ls`: replicas per service (`1/1`, `0/1 (1/1 completed)`).
    fn replicas(&self) -> BTreeMap<String, String> {
        self.docker_ok(&["service", "ls", "--format", "{{.Name}}\t{{.Replicas}}"])
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(n, r)| (n.trim_start_matches("bidsflux_").to_owned(), r.to_owned()))
            .collect()
    }

    /// Running containers of the stack: (service, status as `docker ps` shows it, id).
    fn containers(&self) -> Vec<(String, String, String)> {
        self.docker_ok(&[
            "ps",
            "--filter",
            "label=com.docker.stack.namespace=bidsflux",
            "--format",
            "{{.Label \"com.docker.swarm.service.name\"}}\t{{.Status}}\t{{.ID}}",
        ])
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            Some((f.next()?.trim_start_matches("bidsflux_").to_owned(), f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect()
    }

    /// Waits until each service of `want` runs its replicas (the provisioner job: completed) and
    /// every running container reports healthy.
    async fn converged(&self, want: &BTreeMap<&str, u32>, within: Duration) {
        let result = wait_until("every service at its replicas and healthy", within, || {
            let replicas = self.replicas();
            let containers = self.containers();
            let at_replicas = want.iter().all(|(svc, n)| {
                let r = replicas.get(*svc).map(String::as_str).unwrap_or_default();
                if *svc == "provisioner" { r.contains("(1/1 completed)") } else { r == format!("{n}/{n}") }
            });
            let running: u32 = want.iter().filter(|(s, _)| **s != "provisioner").map(|(_, n)| n).sum();
            let healthy = containers.iter().filter(|(_, status, _)| status.contains("(healthy)")).count();
            let done = at_replicas && healthy == running as usize && containers.len() == healthy;
            async move { done.then_some(()) }
        })
        .await;
        if let Err(e) = result {
            panic!("{e}\nreplicas: {:?}\ncontainers: {:?}\n{}", self.replicas(), self.containers(), self.logs());
        }
    }

    /// The last log lines of every bidsflux service and why tasks failed.
    fn logs(&self) -> String {
        let mut out = String::new();
        for svc in ["receiver", "study-completion", "uploader", "indexer", "provisioner", "nats", "minio"] {
            let name = format!("bidsflux_{svc}");
            let o = self.docker(&["service", "logs", "--raw", "--tail", "15", &name]);
            let ps = self.docker(&[
                "service",
                "ps",
                "--no-trunc",
                "--format",
                "{{.Name}} {{.CurrentState}} {{.Error}}",
                &name,
            ]);
            out.push_str(&format!(
                "--- {svc}\n{}{}{}",
                String::from_utf8_lossy(&ps.stdout),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        out
    }

    /// Peak memory of each running container of the stack, from its cgroup (v1 or v2), in MiB.
    fn peak_memory(&self) -> Vec<(String, u64)> {
        self.containers()
            .into_iter()
            .filter_map(|(svc, _, id)| {
                let full = self.docker_ok(&["inspect", "-f", "{{.Id}}", &id]).trim().to_owned();
                let candidates = [
                    format!("/sys/fs/cgroup/memory/docker/{full}/memory.max_usage_in_bytes"),
                    format!("/sys/fs/cgroup/docker/{full}/memory.peak"),
                    format!("/sys/fs/cgroup/system.slice/docker-{full}.scope/memory.peak"),
                ];
                let bytes = candidates.iter().find_map(|p| std::fs::read_to_string(p).ok())?;
                Some((svc, bytes.trim().parse::<u64>().ok()? >> 20))
            })
            .collect()
    }
}

/// One study of `series` series of `instances` instances, each series in its own directory
/// (as a scanner sends them one by one), for participant `n`.
fn study(dir: &Path, n: usize, series: usize, instances: usize) -> (Vec<PathBuf>, (PathBuf, GeneratedStudy)) {
    let uid = bidsflux_testsupport::dicom::new_uid();
    let mut all = GeneratedStudy { study_instance_uid: uid.clone(), series_instance_uids: vec![], files: vec![] };
    let mut dirs = Vec::new();
    for k in 0..series {
        let spec = StudySpec {
            series: 1,
            instances_per_series: instances,
            patient_name: format!("sub-{n:02}^ses-1"),
            patient_id: format!("SUB{n:02}"),
            study_instance_uid: Some(uid.clone()),
            ..StudySpec::default()
        };
        let d = dir.join(format!("series-{k}"));
        let g = generate_study(&d, &spec).unwrap();
        all.series_instance_uids.extend(g.series_instance_uids);
        all.files.extend(g.files);
        dirs.push(d);
    }
    (dirs, (dir.to_path_buf(), all))
}

/// The variables of `stack/.env.example`, as a site's `stack/.env` starts.
fn env_example() -> BTreeMap<String, String> {
    let out = run_ok(
        Command::new("bash")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .current_dir(repo())
            .args(["-c", "set -a; . stack/.env.example; set +a; env -0"]),
    );
    out.split('\0').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
}

/// The secrets the stack declares, by `bidsflux-provisioner secrets` as a site makes them (its
/// plan printed, GitLab's root password written to a 0600 file): the random ones, and the
/// placeholders of those GitLab makes (a token, the runners' `config.toml`) that let the first
/// deploy start. GitLab is not deployed here, so `gitlab` and `runners` never replace them.
async fn create_secrets(engine: &Engine) {
    use bidsflux_config::secrets as names;
    // As docs/deploy.md has the operator run it: the image, as root, the manager's socket.
    let keep = engine.dir.path().join("keep");
    std::fs::create_dir_all(&keep).unwrap();
    let image = format!("{}:{}", engine.env["BIDSFLUX_IMAGE"], engine.env["BIDSFLUX_TAG"]);
    let plan = engine.docker_ok(&[
        "run",
        "--rm",
        "--user",
        "0",
        "-v",
        &format!("{}:/var/run/docker.sock", engine.sock.display()),
        "-v",
        &format!("{}:/keep", keep.display()),
        &image,
        "bidsflux-provisioner",
        "secrets",
        "--reveal-to",
        "/keep/values",
    ]);
    let values = std::fs::read_to_string(keep.join("values")).unwrap();
    assert!(values.starts_with("gitlab_root_password="), "the root password is kept in the file");
    for name in [
        names::S3_ID,
        names::S3_SECRET,
        names::GITLAB_ROOT_PASSWORD,
        names::DICOM_BOT_GITLAB_TOKEN,
        names::GITLAB_RUNNER_DATA_CONFIG,
        names::GITLAB_RUNNER_PROC_CONFIG,
    ] {
        assert!(plan.contains(&format!("create secret {name} ")), "{name} not created:\n{plan}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stack_deploys_on_a_swarm_and_runs_the_site() {
    bidsflux_telemetry::init_for_tests();
    let started = Instant::now();
    let mut phases: Vec<(&str, f64)> = Vec::new();
    let mut lap = {
        let mut last = Instant::now();
        move |what: &'static str, phases: &mut Vec<(&str, f64)>| {
            phases.push((what, last.elapsed().as_secs_f64()));
            last = Instant::now();
        }
    };

    let mut engine = Engine::start();
    engine.init_swarm();
    lap("dockerd and swarm", &mut phases);

    // Images: from Debian (debootstrap, cached under target/) and the binaries of this build.
    let bins = bidsflux_testsupport::site::bin_dir().unwrap();
    let cache = bins.parent().unwrap().join("deploy-cache");
    let images = run_ok(
        Command::new("bash")
            .arg(repo().join("stack/build-images.sh"))
            .arg("--binaries")
            .arg(&bins)
            .arg("--cache")
            .arg(&cache)
            .env("DOCKER_HOST", engine.host()),
    );
    lap("images", &mut phases);

    // The site's settings: stack/.env.example, then what differs on this machine.
    let home = engine.dir.path().join("bidsflux");
    for d in ["nats", "minio", "spool", "work", "forge"] {
        std::fs::create_dir_all(home.join(d)).unwrap();
    }
    for d in ["config", "logs", "data"] {
        std::fs::create_dir_all(engine.dir.path().join("gitlab").join(d)).unwrap();
    }
    // The image's user (and the S3 stand-in's): uid 10001 writes these.
    run_ok(
        Command::new("chown")
            .args(["-R", "10001:10001"])
            .arg(home.join("minio"))
            .arg(home.join("spool"))
            .arg(home.join("work"))
            .arg(home.join("forge")),
    );
    let (dicom_port, s3_port, console_port, nats_port) =
        (free_port().unwrap(), free_port().unwrap(), free_port().unwrap(), free_port().unwrap());
    let mut env = env_example();
    for line in images.lines().filter_map(|l| l.split_once('=')) {
        env.insert(line.0.to_owned(), line.1.to_owned());
    }
    let settings = [
        ("BIDSFLUX_HOME", home.display().to_string()),
        ("GITLAB_HOME", engine.dir.path().join("gitlab").display().to_string()),
        ("DICOM_PORT", dicom_port.to_string()),
        ("MINIO_API_PORT", s3_port.to_string()),
        ("MINIO_CONSOLE_PORT", console_port.to_string()),
        ("TEST_NATS_PORT", nats_port.to_string()),
        // DCMTK's storescu from this host (through docker's port mapping).
        ("BIDSFLUX_DICOM_ALLOWLIST", "STORESCU".to_owned()),
        // Where DataLad on this host reaches the S3 server: its published port.
        ("BIDSFLUX_S3_PUBLIC_URL", format!("http://127.0.0.1:{s3_port}")),
        ("BIDSFLUX_QUIET_PERIOD", "8s".to_owned()),
        ("BIDSFLUX_SPOOL_JANITOR_INTERVAL", "3s".to_owned()),
        ("BIDSFLUX_LOG_FORMAT", "text".to_owned()),
        ("INDEXER_REPLICAS", "1".to_owned()),
    ];
    env.extend(settings.into_iter().map(|(k, v)| (k.to_owned(), v)));
    engine.env = env;
    create_secrets(&engine).await;

    engine.docker_ok(&[
        "stack",
        "deploy",
        "-c",
        "stack/bidsflux-stack.yml",
        "-c",
        "tests/deploy/override.yml",
        "--resolve-image",
        "never",
        "bidsflux",
    ]);
    let mut want: BTreeMap<&str, u32> = [
        ("nats", 1),
        ("minio", 1),
        ("provisioner", 1),
        ("receiver", 1),
        ("study-completion", 1),
        ("uploader", 1),
        ("indexer", 1),
        ("gitlab", 0),
        ("runner-data", 0),
        ("runner-proc", 0),
        ("otel-collector", 0),
    ]
    .into_iter()
    .collect();
    engine.converged(&want, Duration::from_secs(180)).await;
    lap("deploy until healthy", &mut phases);

    let bus =
        Bus::connect(&format!("nats://127.0.0.1:{nats_port}"), "deploy-test", Duration::from_secs(10)).await.unwrap();
    let sent_dir = engine.dir.path().join("sent");
    let clones = engine.dir.path().join("clones");
    let forge = home.join("forge");
    let repo_of = |project: &str| forge.join(format!("{project}.git"));
    let logs = || engine.logs();
    let git_config = engine.dir.path().join("gitconfig");
    let user_config =
        std::env::var("HOME").map(|h| format!("[include]\n\tpath = {h}/.gitconfig\n")).unwrap_or_default();
    std::fs::write(&git_config, format!("{user_config}[safe]\n\tdirectory = *\n")).unwrap();
    // The S3 credentials the provisioner made, read as an operator would: from a container.
    let uploader = engine.containers().into_iter().find(|c| c.0 == "uploader").unwrap().2;
    let secret = |name: &str| engine.docker_ok(&["exec", &uploader, "cat", &format!("/run/secrets/{name}")]);
    let annex_env = vec![
        ("AWS_ACCESS_KEY_ID", secret(bidsflux_config::secrets::S3_ID)),
        ("AWS_SECRET_ACCESS_KEY", secret(bidsflux_config::secrets::S3_SECRET)),
        ("GIT_CONFIG_COUNT", "1".to_owned()),
        ("GIT_CONFIG_KEY_0", "annex.security.allowed-ip-addresses".to_owned()),
        ("GIT_CONFIG_VALUE_0", "127.0.0.1".to_owned()),
        // The forge's repositories belong to the image's user, not to the test's: git refuses
        // them unless safe.directory says otherwise in a "protected" (global) configuration
        // (a local clone's upload-pack does not see GIT_CONFIG_COUNT).
        ("GIT_CONFIG_GLOBAL", git_config.display().to_string()),
    ];
    let view = |phase: &str| SiteView {
        bus: &bus,
        repo: &repo_of,
        clones: clones.join(phase),
        annex_env: annex_env.clone(),
        spool: home.join("spool"),
        work: home.join("work"),
        logs: &logs,
    };

    // 1. A study through the published DICOM port, back from DataLad byte for byte.
    let (dirs, first) = study(&sent_dir.join("a"), 1, 2, 20);
    let mut sent = vec![first];
    for d in &dirs {
        send_until_accepted_within(dicom_port, d, 20).await;
    }
    check_end_state("stack: one study", &view("1"), &sent, &[]).await;
    lap("one study: storescu → datalad get", &mut phases);

    // 2. Three indexers, then two studies at once: each indexed exactly once.
    engine.docker_ok(&["service", "scale", "--detach", "bidsflux_indexer=3"]);
    want.insert("indexer", 3);
    engine.converged(&want, Duration::from_secs(120)).await;
    let (b_dirs, b) = study(&sent_dir.join("b"), 2, 2, 20);
    let (c_dirs, c) = study(&sent_dir.join("c"), 3, 2, 20);
    sent.extend([b, c]);
    let both = b_dirs.iter().chain(&c_dirs).map(|d| send_until_accepted_within(dicom_port, d, 20));
    futures::future::join_all(both).await;
    check_end_state("stack: 3 indexers, two studies", &view("2"), &sent, &[]).await;
    lap("scale to 3 indexers, two studies", &mut phases);

    // 3. The receiver replaced (`update --force`) while a study arrives series by series: the
    // scanner resends what got no Success, and nothing is lost.
    let before = engine.containers().into_iter().find(|c| c.0 == "receiver").unwrap().2;
    let (d_dirs, d) = study(&sent_dir.join("d"), 4, 4, 25);
    sent.push(d);
    let stored_before = count(&bus, s::STREAM_INSTANCES).await;
    let sender = tokio::spawn(async move {
        let mut refused = 0;
        for dir in d_dirs {
            let deadline = Instant::now() + Duration::from_secs(180);
            while let Err(out) = send(dicom_port, &dir).await {
                refused += 1;
                assert!(Instant::now() < deadline, "{} never accepted: {out}", dir.display());
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        refused
    });
    wait_until("the first series stored", Duration::from_secs(60), || async {
        (count(&bus, s::STREAM_INSTANCES).await >= stored_before + 25).then_some(())
    })
    .await
    .unwrap();
    // The update must start while the scanner still has series to send.
    assert!(!sender.is_finished(), "the study was sent before the receiver's update started");
    engine.docker_ok(&["service", "update", "--force", "--detach", "bidsflux_receiver"]);
    let refused = sender.await.unwrap();
    engine.converged(&want, Duration::from_secs(120)).await;
    let after = engine.containers().into_iter().find(|c| c.0 == "receiver").unwrap().2;
    assert_ne!(before, after, "the receiver's container was replaced");
    check_end_state("stack: receiver replaced mid-study", &view("3"), &sent, &[]).await;
    lap("receiver update --force mid-study", &mut phases);

    let memory = engine.peak_memory();
    println!("deploy: failed sends retried by the scanner during the receiver's update: {refused}");
    println!("deploy: peak memory per container (MiB): {memory:?}");
    for (what, secs) in &phases {
        println!("deploy: {what}: {secs:.1} s");
    }
    let teardown = Instant::now();
    drop(bus);
    drop(engine);
    println!("deploy: teardown: {:.1} s", teardown.elapsed().as_secs_f64());
    println!("deploy: total: {:.1} s", started.elapsed().as_secs_f64());
}
