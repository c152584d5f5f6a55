//! cachefrom
pub mod dockerfile;
pub mod refs;
pub mod ci;
pub mod git;
pub mod backend;
pub mod plan;
pub mod docker;
pub mod registry;
pub mod report;
pub mod engine;
pub mod exec;
pub mod settings;
