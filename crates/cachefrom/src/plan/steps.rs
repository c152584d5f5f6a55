//! The steps of a plan, in the order the executor carries them out, and the writes each build is
//! followed by; the recovery after a failed one-build run.

use crate::backend::{Backend, CacheLocation};

use super::vocabulary::{Builder, CacheRef, CacheWrite, Execution, Recovery, Step};
use super::{Plan, StagePlan};

impl Plan {
    pub(crate) fn compute_steps(&self) -> Vec<Step> {
        let mut steps = Vec::new();
        for stage in self.builds() {
            steps.push(Step::Build { stage: stage.name.clone() });
            for write in self.writes_after(stage) {
                steps.push(Step::Write { stage: stage.name.clone(), write });
            }
        }
        if self.push_tags && self.builder == Builder::Classic {
            steps.extend(self.tags.iter().map(|tag| Step::PushImage { image: tag.clone() }));
        }
        steps
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
