//! A real standalone `buildkitd` behind `docker buildx create --driver remote`, as teams that
//! outgrow one runner use it: the s3 backend written and read on moto's S3 server (`cargo xtask
//! stack up --s3`), and the registry backend through the remote builder, with the trap-style
//! recovery after a failed stage. Run when `CACHEFROM_TEST_BUILDKITD` names a `buildkitd` binary
//! (the README says how to build one); reported as ignored otherwise.
//!
//! A fresh runner here is a fresh daemon: stopped, its state removed, started again.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use cachefrom_tests::*;

const S3_ENDPOINT: &str = "http://127.0.0.1:5003";
const S3_BUCKET: &str = "cachefrom";
/// A secret key no output may show (moto takes any).
const SECRET_KEY: &str = "cachefrom-test-secret-Zq8v3K2pLm9Xw";

/// A `buildkitd` of the test's own: an OCI worker with the stack's runc, the local registry
/// over plain HTTP, a unix socket in its own directory; attached as a remote buildx builder.
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    builder: String,
}

impl Daemon {
    fn start(name: &str) -> Daemon {
        let binary = std::env::var("CACHEFROM_TEST_BUILDKITD").expect("CACHEFROM_TEST_BUILDKITD names buildkitd");
        assert!(Path::new(&binary).is_file(), "CACHEFROM_TEST_BUILDKITD={binary} is not a file");
        let dir = tempfile::Builder::new().prefix("buildkitd-").tempdir_in("/var/tmp").unwrap();
        let builder = format!("cf-{name}-{}", std::process::id());
        let mut daemon = Daemon { dir, child: None, builder };
        daemon.launch(&binary);
        let socket = daemon.socket();
        let created = Command::new("docker")
            .args(["buildx", "create", "--name", &daemon.builder, "--driver", "remote"])
            .arg(format!("unix://{}", socket.display()))
            .output()
            .unwrap();
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("buildkitd.sock")
    }

    fn launch(&mut self, binary: &str) {
        let config = self.dir.path().join("buildkitd.toml");
        std::fs::write(
            &config,
            format!(
                "root = \"{}\"\n[grpc]\n  address = [\"unix://{}\"]\n[worker.oci]\n  enabled = true\n  networkMode = \"host\"\n[worker.containerd]\n  enabled = false\n[registry.\"{REGISTRY}\"]\n  http = true\n",
                self.dir.path().join("root").display(),
                self.socket().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(self.dir.path().join("buildkitd.log")).unwrap();
        let child = Command::new(binary)
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("buildkitd starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(self.socket()).is_err() {
            assert!(Instant::now() < deadline, "buildkitd did not listen within 30 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the buildkitd this test started.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while child.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.wait();
        }
        unmount_under(self.dir.path());
    }

    /// A fresh runner: the daemon stopped, its whole state removed, started again.
    fn fresh(&mut self) {
        let binary = std::env::var("CACHEFROM_TEST_BUILDKITD").unwrap();
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.path().join("root"));
        self.launch(&binary);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["buildx", "rm", "--force", &self.builder]).output();
        self.stop();
    }
}

fn build(dir: &Path, image: &str, backend: &str, builder: &str, extra: &[&str]) -> (Output, String, serde_json::Value) {
    let report = dir.join("report.json");
    let _ = std::fs::remove_file(&report);
    let output = Command::new(cachefrom_binary())
        .args(["build", "--image", image, "--branch", "main", "--default-branch", "main", "--backend", backend])
        .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}"), "--report"])
        .arg(&report)
        .args(extra)
        .arg(dir)
        .args(["--", "--builder", builder, "--network=none"])
        .env("AWS_ACCESS_KEY_ID", "cachefrom-test")
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .unwrap();
    let log = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    let report = std::fs::read_to_string(&report).ok().and_then(|text| serde_json::from_str(&text).ok());
    (output, log, report.unwrap_or_default())
}

fn counts(report: &serde_json::Value) -> Vec<(String, u64, u64)> {
    stage_counts(report)
}

fn s3_answers() -> bool {
    std::process::Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "--max-time", "3", S3_ENDPOINT])
        .status()
        .is_ok_and(|status| status.success())
}

#[test]
#[cfg_attr(not(buildkitd_given), ignore = "needs a buildkitd: set CACHEFROM_TEST_BUILDKITD (README: a real buildkitd)")]
fn the_s3_backend_is_written_and_read_through_a_remote_buildkitd() {
    let _serial = serial();
    need_stack("the_s3_backend_is_written_and_read_through_a_remote_buildkitd");
    assert!(s3_answers(), "no S3 server at {S3_ENDPOINT}: run `cargo xtask stack up --s3`");
    let mut daemon = Daemon::start("s3");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let dir = project.path();
    let image = unique_repository("s3");
    let backend = format!("s3,bucket={S3_BUCKET},region=us-east-1,endpoint_url={S3_ENDPOINT},use_path_style=true");

    // Seed on main.
    let (output, log, report) = build(dir, &image, &backend, &daemon.builder, &[]);
    assert!(output.status.success(), "{log}");
    assert!(counts(&report).iter().all(|(_, cached, _)| *cached == 0), "{report:#}");
    let engine = report["engine"].as_str().unwrap_or_default().to_string();
    assert!(engine.contains("remote driver") && engine.contains(&daemon.socket().display().to_string()), "{engine}");
    assert!(!log.contains("No output specified"), "{log}");

    // A fresh runner, nothing changed: every step from the s3 cache.
    daemon.fresh();
    let (output, log, report) = build(dir, &image, &backend, &daemon.builder, &[]);
    assert!(output.status.success(), "{log}");
    for (stage, cached, total) in counts(&report) {
        assert!(total > 0 && cached == total, "{stage}: {cached}/{total}\n{log}");
    }

    // A source change on a fresh runner: the dependency steps still hit.
    std::fs::write(dir.join("src/main.txt"), "fn main() { changed }\n").unwrap();
    git(dir, &["commit", "-q", "-am", "c1"]).unwrap();
    daemon.fresh();
    let (output, log, report) = build(dir, &image, &backend, &daemon.builder, &[]);
    assert!(output.status.success(), "{log}");
    let deps = counts(&report).into_iter().find(|(stage, _, _)| stage == "deps").unwrap();
    assert_eq!((deps.1, deps.2), (2, 2), "{log}");

    // The secret key shows nowhere.
    for (what, text) in [("output", log.clone()), ("report", report.to_string())] {
        assert!(!text.contains(SECRET_KEY), "the secret key shows in the {what}");
    }

    // A bucket that does not exist: one clear line, and the build goes on without the cache.
    let missing = backend.replace(&format!("bucket={S3_BUCKET}"), "bucket=no-such-bucket");
    let (output, log, _) = build(dir, &image, &missing, &daemon.builder, &[]);
    assert!(output.status.success(), "{log}");
    let warnings: Vec<&str> = log.lines().filter(|line| line.starts_with("cachefrom: warning:")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("no-such-bucket does not exist") && warnings[0].contains("create it"), "{log}");
    assert!(!log.contains("exporting the cache of runtime again"), "a missing bucket is not tried again:\n{log}");

    // A key the server refuses: a moto that authenticates every request after the one that
    // makes its bucket. One clear line, no retry, the build goes on.
    let refusing = RefusingS3::start();
    let refused = backend.replace(S3_ENDPOINT, &refusing.url).replace(&format!("bucket={S3_BUCKET}"), "bucket=guarded");
    let (output, log, _) = build(dir, &image, &refused, &daemon.builder, &[]);
    assert!(output.status.success(), "{log}");
    let warnings: Vec<&str> = log.lines().filter(|line| line.starts_with("cachefrom: warning:")).collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(warnings[0].contains("refused the credentials") && warnings[0].contains("AWS_SECRET_ACCESS_KEY"), "{log}");
    assert!(!log.contains(SECRET_KEY), "the secret key shows in the output");
}

/// moto's S3 server from the stack's venv on 127.0.0.1:5004, authenticating every request after
/// the first (which makes the bucket `guarded`): any key is refused. Stopped when dropped.
struct RefusingS3 {
    url: String,
    child: Child,
}

impl RefusingS3 {
    fn start() -> RefusingS3 {
        let dir = std::env::var_os("CACHEFROM_STACK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/cachefrom-stack"));
        let moto = dir.join("s3/bin/moto_server");
        assert!(moto.is_file(), "{} is missing: run `cargo xtask stack up --s3`", moto.display());
        let child = Command::new(moto)
            .args(["-H", "127.0.0.1", "-p", "5004"])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let url = "http://127.0.0.1:5004".to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect("127.0.0.1:5004").is_err() {
            assert!(Instant::now() < deadline, "moto did not listen on 127.0.0.1:5004");
            std::thread::sleep(Duration::from_millis(100));
        }
        let made =
            Command::new("curl").args(["-sf", "-X", "PUT", "--max-time", "5", &format!("{url}/guarded")]).status();
        assert!(made.is_ok_and(|status| status.success()), "the bucket was not made");
        RefusingS3 { url, child }
    }
}

impl Drop for RefusingS3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[cfg_attr(not(buildkitd_given), ignore = "needs a buildkitd: set CACHEFROM_TEST_BUILDKITD (README: a real buildkitd)")]
fn the_registry_backend_through_a_remote_buildkitd_recovers_after_a_failed_stage() {
    let _serial = serial();
    need_stack("the_registry_backend_through_a_remote_buildkitd_recovers_after_a_failed_stage");
    let mut daemon = Daemon::start("registry");
    let project = synthetic_project(SYNTHETIC_DOCKERFILE).unwrap();
    let dir = project.path();
    let image = unique_repository("remote-registry");

    // The final stage fails: the stages it finished still get their caches.
    let (output, log, report) = build(dir, &image, "registry", &daemon.builder, &["--build-arg", "FAIL=1"]);
    assert_eq!(output.status.code(), Some(1), "{log}");
    assert!(report["engine"].as_str().unwrap_or_default().contains("remote driver"), "{report:#}");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
    let tags = registry_tags(REGISTRY, path).unwrap();
    for tag in ["cache-deps.main", "cache-builder.main"] {
        assert!(tags.contains(&tag.to_string()), "{tag} was written after the failure: {tags:?}\n{log}");
    }

    // A fresh runner: the stages that finished hit their caches.
    daemon.fresh();
    let (output, log, report) = build(dir, &image, "registry", &daemon.builder, &[]);
    assert!(output.status.success(), "{log}");
    for (stage, cached, total) in counts(&report) {
        if stage != "runtime" {
            assert_eq!(cached, total, "{stage}\n{log}");
        }
    }
    daemon.fresh();
    let (output, log, report) = build(dir, &image, "registry", &daemon.builder, &[]);
    assert!(output.status.success(), "{log}");
    for (stage, cached, total) in counts(&report) {
        assert!(total > 0 && cached == total, "{stage}: {cached}/{total}\n{log}");
    }
}

#[test]
#[cfg_attr(not(buildkitd_given), ignore = "needs a buildkitd: set CACHEFROM_TEST_BUILDKITD (README: a real buildkitd)")]
fn a_cancelled_build_on_a_remote_buildkitd_writes_what_it_finished() {
    use std::io::BufRead as _;
    let _serial = serial();
    need_stack("a_cancelled_build_on_a_remote_buildkitd_writes_what_it_finished");
    let daemon = Daemon::start("cancel");
    let project = synthetic_project(SLOW_DOCKERFILE).unwrap();
    let image = unique_repository("remote-cancel");
    let mut child = Command::new(cachefrom_binary())
        .args(["build", "--image", &image, "--branch", "main", "--default-branch", "main"])
        .args(["--build-arg", &format!("BASE={RUNTIME_BASE_IMAGE}")])
        .arg(project.path())
        .args(["--", "--builder", &daemon.builder, "--network=none"])
        .env("CI", "true")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = Vec::new();
    loop {
        let line = lines_rx.recv_timeout(Duration::from_secs(120)).expect("the slow step starts");
        seen.push(line.clone());
        if line.contains("slow-step-started") && !line.contains("RUN") {
            break;
        }
    }
    let signalled = Instant::now();
    // SAFETY: kill(2) on the cachefrom this test started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    seen.extend(lines_rx.try_iter());
    let log = seen.join("\n");
    assert_eq!(status.code(), Some(143), "{log}");
    assert!(signalled.elapsed() < Duration::from_secs(30), "{log}");
    let path = image.strip_prefix(&format!("{REGISTRY}/")).unwrap();
    let tags = registry_tags(REGISTRY, path).unwrap();
    assert!(tags.contains(&"cache-deps.main".to_string()), "the finished stage's cache: {tags:?}\n{log}");
}
