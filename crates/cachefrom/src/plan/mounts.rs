//! The cache mounts a plan keeps ([`crate::mounts`]): which, where each is read from and written
//! to, and the two small builds that restore and save them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, CacheLocation};
use crate::dockerfile::{Dockerfile, Stage};
use crate::mounts::{mount_tag, CacheMount};

use super::vocabulary::{Builder, CacheRef, Level};
use super::{Plan, PlanOptions};

/// `jobs` as one shell line that runs them at once and fails when any fails.
fn in_parallel(jobs: &[String]) -> String {
    let started: Vec<String> = jobs.iter().enumerate().map(|(n, job)| format!("( {job} ) & p{n}=$!")).collect();
    let waited: Vec<String> = (0..jobs.len()).map(|n| format!("wait $p{n}")).collect();
    format!("{}; {}", started.join("; "), waited.join(" && "))
}

/// The build argument whose value, new each run, makes the restore and save builds' `RUN`s run.
pub const RUN_ARG: &str = "CACHEFROM_RUN";

/// One cache mount the plan keeps: where its contents are read from and written to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    /// Its short name in the run's files and builds: `m0`, `m1`, …
    pub name: String,
    /// The mount as the Dockerfile has it (the first `RUN` that uses it).
    pub mount: CacheMount,
    /// The `RUN` instructions that use it, `[stage] RUN …` as written.
    pub steps: Vec<(String, String)>,
    /// Where its contents may be read from, most specific first.
    pub cache_from: Vec<CacheRef>,
    /// Where they are written.
    pub cache_to: Vec<CacheRef>,
}

/// What [`mounts_of`] finds: the mounts kept, the image their builds run in, and notes.
pub(crate) struct PlannedMounts {
    pub mounts: Vec<MountPlan>,
    pub image: Option<String>,
    /// The image the restore build runs in first, when not `image`: see [`Plan::restore_image`].
    pub restore_image: Option<String>,
    pub notes: Vec<String>,
}

/// The cache mounts of the stages built (`order`), as the options keep them.
pub(crate) fn mounts_of(
    options: &PlanOptions,
    dockerfile: &Dockerfile,
    order: &[&Stage],
    chain: &[Level],
    write_levels: &[Level],
) -> PlannedMounts {
    let mut planned = PlannedMounts { mounts: Vec::new(), image: None, restore_image: None, notes: Vec::new() };
    let used: Vec<(&Stage, &CacheMount)> =
        order.iter().flat_map(|stage| stage.cache_mounts.iter().map(move |mount| (*stage, mount))).collect();
    if used.is_empty() {
        return planned;
    }
    let why_not = if !options.cache_mounts {
        Some("turned off (--cache-mounts off)".to_string())
    } else if options.builder != Builder::Buildx {
        Some("the classic builder has no cache mounts".to_string())
    } else if !matches!(options.backend, Backend::Registry { .. } | Backend::Local { .. } | Backend::Tarball { .. }) {
        Some(format!("the {} backend does not keep them (registry, local and tarball do)", options.backend.name()))
    } else {
        None
    };
    if let Some(why) = why_not {
        planned.notes.push(format!("cache mounts are not kept across runners: {why}"));
        return planned;
    }
    let by_key: BTreeMap<String, &Stage> = dockerfile.stages.iter().map(|stage| (stage.key(), stage)).collect();
    let platform = options.platform.as_deref();
    let mut by_identity: BTreeMap<String, usize> = BTreeMap::new();
    for (stage, mount) in used {
        let step = (stage.display_name(), mount.written.clone());
        if let Some(why) = &mount.not_kept {
            planned.notes.push(format!(
                "the cache mount {} of stage {} is not kept: {why}",
                crate::git::escaped(&mount.target),
                stage.display_name()
            ));
            continue;
        }
        // The restore and save builds run in the image the first such stage starts from.
        if planned.image.is_none() {
            match root_image(stage, &by_key) {
                Some(image) => planned.image = Some(image),
                None => {
                    planned.notes.push(format!(
                        "the cache mount {} of stage {} is not kept: the stage starts from scratch (no tar to pack it with)",
                        crate::git::escaped(&mount.target),
                        stage.display_name()
                    ));
                    continue;
                }
            }
        }
        let identity = mount.identity(platform);
        if let Some(index) = by_identity.get(&identity) {
            planned.mounts[*index].steps.push(step);
            continue;
        }
        let refs = |levels: &[Level]| -> Vec<CacheRef> {
            levels
                .iter()
                .filter_map(|level| {
                    let key = level.key(&options.git).ok()?;
                    let tag = mount_tag(&identity, &mount.id, key.as_ref());
                    let location = mount_location(&options.backend, options, &tag);
                    Some(CacheRef { level: *level, tag, location, platform: None })
                })
                .collect()
        };
        by_identity.insert(identity.clone(), planned.mounts.len());
        planned.mounts.push(MountPlan {
            name: format!("m{}", planned.mounts.len()),
            mount: mount.clone(),
            steps: vec![step],
            cache_from: refs(chain),
            cache_to: refs(write_levels),
        });
    }
    // The target's own base, which the build pulls anyway, is most often a small runtime image:
    // the restore runs there while the mounts' image (a toolchain, a gigabyte or more) is pulled
    // beside it. One platform only: the restore build runs on the engine's.
    let one_platform = !options.platform.as_deref().is_some_and(|list| list.contains(','));
    if let (Some(image), Some(target), true) = (&planned.image, order.last(), one_platform) {
        planned.restore_image = root_image(target, &by_key).filter(|base| base != image);
    }
    planned
}

/// The image a stage starts from, through the stages it is built `FROM`; `None` for `scratch`.
fn root_image(stage: &Stage, by_key: &BTreeMap<String, &Stage>) -> Option<String> {
    let mut current = stage;
    for _ in 0..by_key.len() + 1 {
        match by_key
            .values()
            .find(|other| other.name.as_deref() == Some(current.base.as_str()) && other.index < current.index)
        {
            Some(parent) => current = parent,
            None if current.base == "scratch" => return None,
            // It is written into the restore and save builds' Dockerfiles: one plain word only.
            None if current.base.chars().any(|c| c.is_whitespace() || c.is_control() || c == '\\') => return None,
            None => return Some(current.base.clone()),
        }
    }
    None
}

/// Where a saved mount lives: an artifact in the registry, a file in the cache directory.
fn mount_location(backend: &Backend, options: &PlanOptions, tag: &str) -> CacheLocation {
    match backend {
        Backend::Local { dir } | Backend::Tarball { dir } => CacheLocation::TarFile(
            dir.join(crate::backend::repository_dir_name(&options.repository)).join(format!("{tag}.tar.gz")),
        ),
        _ => CacheLocation::Image(options.repository.with_tag(tag)),
    }
}

impl Plan {
    /// Where the run keeps its cache-mount files: `in/` (fetched archives, the restore build's
    /// context), `out/` (what the save build outputs), `empty/` (the save build's context).
    pub fn mounts_dir(&self) -> PathBuf {
        self.work_dir.join("mounts")
    }

    /// The restore build's Dockerfile: one `RUN` that mounts every kept cache with its own
    /// options and the fetched archives, and unpacks each archive that was fetched into its mount
    /// when the mount is empty (a runner that kept its own is at least as fresh), all at once.
    pub fn restore_dockerfile(&self) -> String {
        self.restore_dockerfile_in(self.restore_image.as_deref().or(self.mount_image.as_deref()))
    }

    /// The restore build's Dockerfile, run again in the mounts' own image (see
    /// [`Plan::restore_image`]).
    pub fn restore_again_dockerfile(&self) -> String {
        self.restore_dockerfile_in(self.mount_image.as_deref())
    }

    fn restore_dockerfile_in(&self, image: Option<&str>) -> String {
        let jobs = self.mount_jobs(|at, name| {
                format!(
                    "if [ -f /cachefrom/in/{name}.tar.gz ] && [ -z \"$(ls -A {at})\" ]; then tar -xzpf /cachefrom/in/{name}.tar.gz --numeric-owner -C {at}; fi"
                )
        });
        format!(
            "FROM {}\nUSER 0:0\nARG {RUN_ARG}\nRUN {} --mount=type=bind,target=/cachefrom/in \\\n    {}\n",
            image.unwrap_or("scratch"),
            self.mount_flags(),
            in_parallel(&jobs)
        )
    }

    /// The save build's Dockerfile: one `RUN` that packs every mount at once into `<name>.tar`
    /// (owners, modes and times kept, sorted by name: the same contents give the same bytes) with
    /// its size in `<name>.size`, or writes only `<name>.too-big` when it is over the cap; output
    /// as files, which cachefrom compresses into `<name>.tar.gz` on every core
    /// ([`crate::mounts::compress_file`]): no compressor runs in the build's one container.
    pub fn save_dockerfile(&self) -> String {
        let image = self.mount_image.as_deref().unwrap_or("scratch");
        let max_kb = self.cache_mount_max_size / 1024;
        let jobs = self.mount_jobs(|at, name| {
                format!(
                    "cd {at} && size=$(du -sk . | cut -f1) && if [ \"$size\" -gt {max_kb} ]; then echo \"$size\" > /cachefrom/out/{name}.too-big; elif [ -n \"$(ls -A .)\" ]; then {{ tar --sort=name --numeric-owner -cf - . 2>/dev/null || tar -cf - .; }} > /cachefrom/out/{name}.tar && echo \"$size\" > /cachefrom/out/{name}.size; fi"
                )
        });
        format!(
            "FROM {image} AS pack\nUSER 0:0\nARG {RUN_ARG}\nRUN {} \\\n    mkdir -p /cachefrom/out && {}\nFROM scratch\nCOPY --from=pack /cachefrom/out/ /\n",
            self.mount_flags(),
            in_parallel(&jobs)
        )
    }

    /// `job(at, name)` for every kept cache: its place in the builds and its short name.
    fn mount_jobs(&self, job: impl Fn(&str, &str) -> String) -> Vec<String> {
        self.mounts.iter().map(|mount| job(&format!("/cachefrom/{}", mount.name), &mount.name)).collect()
    }

    /// `--mount=…` of every kept cache, at `/cachefrom/<name>`.
    fn mount_flags(&self) -> String {
        let flags: Vec<String> = self
            .mounts
            .iter()
            .map(|mount| format!("--mount={}", mount.mount.mount_at(&format!("/cachefrom/{}", mount.name))))
            .collect();
        flags.join(" ")
    }

    /// The restore build: its `RUN` runs (see [`Plan::mount_build_start`]), nothing output.
    pub(crate) fn restore_argv(&self) -> Vec<String> {
        self.restore_argv_of("restore.Dockerfile")
    }

    /// The restore build again, in the mounts' own image, when it ran in another first.
    pub(crate) fn restore_again_argv(&self) -> Option<Vec<String>> {
        self.restore_image.as_ref()?;
        Some(self.restore_argv_of("restore-again.Dockerfile"))
    }

    /// A restore build of the Dockerfile `file` in the mounts' directory, nothing output.
    fn restore_argv_of(&self, file: &str) -> Vec<String> {
        let dir = self.mounts_dir();
        let mut argv = self.mount_build_start(&dir.join(file));
        argv.extend(["--output".into(), "type=cacheonly".into()]);
        argv.push(dir.join("in").display().to_string());
        argv
    }

    /// `docker pull` of the mounts' image, beside a restore build that runs in another: with the
    /// engine's own builder (the `docker` driver) the build then finds it pulled and unpacked.
    pub(crate) fn mount_image_pull(&self) -> Option<Vec<String>> {
        if self.restore_image.is_none() || self.builder_keeps_no_image {
            return None;
        }
        let mut argv: Vec<String> = vec!["pull".into(), "--quiet".into()];
        if let Some(platform) = &self.platform {
            argv.extend(["--platform".into(), platform.clone()]);
        }
        argv.push(self.mount_image.clone()?);
        Some(argv)
    }

    /// The save build: its `RUN` runs, its files output to `out/`.
    pub(crate) fn save_argv(&self) -> Vec<String> {
        let dir = self.mounts_dir();
        let mut argv = self.mount_build_start(&dir.join("save.Dockerfile"));
        argv.extend(["--output".into(), format!("type=local,dest={}", dir.join("out").display())]);
        argv.push(dir.join("empty").display().to_string());
        argv
    }

    /// `--no-cache` would not do: BuildKit then gives the `RUN` fresh cache mounts. A value of
    /// [`RUN_ARG`] new each run (docker reads it from the environment) makes the `RUN` run; the
    /// builds need no network.
    fn mount_build_start(&self, dockerfile: &Path) -> Vec<String> {
        let mut argv: Vec<String> =
            ["buildx", "build", "--progress=plain", "--network=none", "-f"].iter().map(|s| s.to_string()).collect();
        argv.push(dockerfile.display().to_string());
        argv.extend(["--build-arg".into(), RUN_ARG.into()]);
        // The namespace of cache ids, when the build sets one, applies to these builds too.
        for (name, value) in self.build_args.iter().chain(self.docker.build_args.iter()) {
            if name == "BUILDKIT_CACHE_MOUNT_NS" {
                argv.extend(["--build-arg".into(), format!("{name}={value}")]);
            }
        }
        if let Some(builder) = &self.docker.builder {
            argv.extend(["--builder".into(), builder.clone()]);
        }
        argv
    }
}
