//! The steps of a plan, in the order the executor carries them out, and the writes each build is
//! followed by; the recovery after a failed one-build run.

use crate::backend::{Backend, CacheLocation};

use super::vocabulary::{Builder, CacheRef, CacheWrite, Execution, Fallback, Recovery, Step};

/// At most this many builds of one step when a [`Fallback`] builds it again.
pub const BUILD_TRIES: u32 = 3;
use super::{Plan, StagePlan};

impl Plan {
    pub(crate) fn compute_steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        if let Some(reuse) = self.reuse_unchanged_step() {
            steps.push(reuse);
        }
        if !self.mounts.is_empty() {
            steps.push(Step::RestoreMounts {
                argv: self.restore_argv(),
                pull: self.mount_image_pull(),
                again: self.restore_again_argv(),
            });
        }
        if let Some(mount) = self.mount_base_layers_step() {
            steps.push(mount);
        }
        for stage in self.builds() {
            steps.push(Step::Build {
                stage: stage.name.clone(),
                argv: self.planned_argv(stage),
                fallbacks: self.fallbacks(stage),
            });
            if let (Backend::Registry { .. } | Backend::Local { .. } | Backend::Tarball { .. }, Some(primary)) =
                (&self.backend, self.primary_write(stage))
            {
                steps.push(Step::WriteBack { stage: stage.name.clone(), to: primary.location.to_string() });
            }
            for write in self.writes_after(stage) {
                steps.push(Step::Write { stage: stage.name.clone(), write });
            }
        }
        if !self.mounts.is_empty() && !self.write_levels.is_empty() {
            steps.push(Step::SaveMounts { argv: self.save_argv() });
        }
        if self.execution == Execution::OneBuild {
            let target = self.target_stage();
            let others: Vec<&CacheRef> =
                self.stages.iter().filter(|other| !other.is_target).flat_map(|other| other.cache_to.iter()).collect();
            let writes = if others.is_empty() { Vec::new() } else { self.writes_to(target, &others) };
            if !writes.is_empty() {
                steps.push(Step::RefreshStageTags { stage: target.name.clone(), writes });
            }
        }
        if self.push_tags && self.builder == Builder::Classic {
            steps.extend(self.tags.iter().map(|tag| Step::PushImage { image: tag.clone() }));
        }
        steps
    }

    /// The argument vector of the build of `stage`, every candidate a `--cache-from`: what
    /// [`Step::Build`] and [`Recovery`] hold.
    pub(crate) fn planned_argv(&self, stage: &StagePlan) -> Vec<String> {
        let progress = if self.builder == Builder::Buildx { "rawjson" } else { "plain" };
        self.build_command(stage, &self.all_candidate_sources(stage), progress)
    }

    /// The planned argument vector of a build of `stage`: its build step's, else its recovery's.
    pub fn build_argv(&self, stage: &str) -> Option<&[String]> {
        self.steps
            .iter()
            .find_map(|step| match step {
                Step::Build { stage: built, argv, .. } if built == stage => Some(argv.as_slice()),
                _ => None,
            })
            .or_else(|| {
                self.recovery.iter().find(|recovery| recovery.stage == stage).map(|recovery| recovery.argv.as_slice())
            })
    }

    /// The fallbacks of a build step of `stage` (see [`Fallback`]).
    pub fn fallbacks(&self, stage: &StagePlan) -> Vec<Fallback> {
        let mut fallbacks = Vec::new();
        if matches!(self.backend, Backend::Registry { .. } | Backend::Inline) && !stage.cache_from.is_empty() {
            fallbacks.push(Fallback::WithoutBrokenSource);
        }
        if self.builder == Builder::Buildx {
            fallbacks.push(Fallback::AgainAfterImageStoreRace { tries: BUILD_TRIES });
            if self.primary_write(stage).is_some() {
                fallbacks.push(Fallback::ExportAgain { tries: BUILD_TRIES });
            }
        }
        fallbacks
    }

    /// The base images in this run's registry, other than its repository, whose layers the
    /// registry cache export would upload again: mounted first (registry backend, writes only).
    fn mount_base_layers_step(&self) -> Option<Step> {
        if !matches!(self.backend, Backend::Registry { .. }) || self.write_levels.is_empty() {
            return None;
        }
        let images: Vec<String> = self
            .external_images
            .iter()
            .filter(|image| {
                crate::inputs::image_reference(image).is_some_and(|(repository, _)| {
                    repository.registry == self.repository.registry && repository.path != self.repository.path
                })
            })
            .cloned()
            .collect();
        if images.is_empty() {
            return None;
        }
        let platform = self.platform.clone().unwrap_or_else(|| crate::dockerfile::Platform::host().to_string());
        // One platform only: several are left to the export.
        if platform.contains(',') {
            return None;
        }
        Some(Step::MountBaseLayers { images, platform })
    }

    /// The check for an unchanged build, where a record can stand for the run's output: one
    /// registry build of the target, no local image wanted, image tags (if any) pushed to the
    /// cache's repository.
    fn reuse_unchanged_step(&self) -> Option<Step> {
        if self.execution != Execution::OneBuild
            || !matches!(self.backend, Backend::Registry { .. })
            || self.wants_local_image()
        {
            return None;
        }
        let target = self.target_stage();
        let primary = self.primary_write(target)?;
        let tags_stand_for_record =
            self.tags.is_empty() || (self.push_tags && self.tags.iter().all(|tag| self.repository.tag_of(tag).is_ok()));
        if !tags_stand_for_record {
            return None;
        }
        Some(Step::ReuseUnchanged {
            record_on: primary.location.to_string(),
            image_tags: if self.push_tags { self.tags.clone() } else { Vec::new() },
            writes: self.writes_after(target),
        })
    }

    pub(crate) fn compute_recovery(&self) -> Vec<Recovery> {
        if self.execution != Execution::OneBuild || self.write_levels.is_empty() {
            return Vec::new();
        }
        self.stages
            .iter()
            .rev()
            .filter(|stage| !stage.is_target)
            .map(|stage| Recovery {
                stage: stage.name.clone(),
                covers: vec![stage.name.clone()],
                argv: self.planned_argv(stage),
                writes: self.writes_after(stage),
            })
            .collect()
    }

    /// Where the build of `stage` exports: the first tag `stage` writes. The other tags of the
    /// stage and of the stages it reads from get a copy (see [`Plan::writes_after`]).
    pub fn primary_write<'a>(&'a self, stage: &'a StagePlan) -> Option<&'a CacheRef> {
        stage.cache_to.first()
    }

    /// The writes that follow a successful build of `stage`: its own tags that the build did not
    /// export to itself (a one-build target's cache holds every stage's layers, so its tags serve
    /// every stage).
    pub fn writes_after(&self, stage: &StagePlan) -> Vec<CacheWrite> {
        let all: Vec<&CacheRef> = stage.cache_to.iter().collect();
        self.writes_to(stage, &all)
    }

    /// The writes that put the cache the build of `stage` exported at each of `locations`.
    pub fn writes_to(&self, stage: &StagePlan, all: &[&CacheRef]) -> Vec<CacheWrite> {
        let Some(primary) = self.primary_write(stage) else { return Vec::new() };
        match &self.backend {
            // The build pushes every tag it was given already.
            Backend::Inline if self.pushes_in_build(stage) => Vec::new(),
            Backend::Inline => stage
                .cache_to
                .iter()
                .filter_map(|write| match &write.location {
                    CacheLocation::Image(image) => Some(CacheWrite::PushCacheImage { image: image.clone() }),
                    _ => None,
                })
                .collect(),
            Backend::Registry { .. } => {
                let to: Vec<String> = all
                    .iter()
                    .filter(|write| write.location != primary.location)
                    .map(|write| write.location.to_string())
                    .collect();
                if to.is_empty() {
                    Vec::new()
                } else {
                    vec![CacheWrite::CopyTag { from: primary.location.to_string(), to }]
                }
            }
            Backend::Local { .. } | Backend::Tarball { .. } => all
                .iter()
                .filter_map(|write| {
                    let from = self.staging_dir(&stage.name);
                    match &write.location {
                        CacheLocation::Directory(dir) => Some(CacheWrite::CopyDir { from, to: dir.clone() }),
                        CacheLocation::TarFile(file) => Some(CacheWrite::Pack { from, to: file.clone() }),
                        _ => None,
                    }
                })
                .collect(),
            // BuildKit writes every name itself (see `build_command`).
            Backend::S3 { .. } | Backend::Gha { .. } => Vec::new(),
        }
    }
}
