//! Showing BuildKit's progress as it comes: plain lines like `--progress=plain`, a compact live
//! line on a terminal, or nothing.

use std::collections::BTreeMap;

use crate::output::Output;
use crate::output::OutputStyle;
use crate::report::ProgressEvent;

/// Shows progress events in the chosen style.
pub(crate) struct Renderer<'a> {
    output: &'a dyn Output,
    style: OutputStyle,
    stage: String,
    own_prefixes: Vec<String>,
    numbers: BTreeMap<String, usize>,
    named: std::collections::BTreeSet<String>,
    steps_done: usize,
    steps_cached: usize,
    current: String,
    live: bool,
}

impl<'a> Renderer<'a> {
    pub(crate) fn new(
        style: OutputStyle,
        output: &'a dyn Output,
        stage: &str,
        own_stages: Vec<String>,
    ) -> Renderer<'a> {
        let own_prefixes = own_stages.iter().map(|name| format!("[{name} ")).collect();
        Renderer {
            output,
            style,
            stage: stage.to_string(),
            own_prefixes,
            numbers: BTreeMap::new(),
            named: Default::default(),
            steps_done: 0,
            steps_cached: 0,
            current: String::new(),
            live: false,
        }
    }

    fn number(&mut self, name: &str) -> usize {
        let next = self.numbers.len() + 1;
        *self.numbers.entry(name.to_string()).or_insert(next)
    }

    pub(crate) fn show(&mut self, event: &ProgressEvent, elapsed: f64) {
        match self.style {
            OutputStyle::Quiet => {
                if let ProgressEvent::Text(text) = event {
                    self.output.line(text);
                }
            }
            OutputStyle::Plain | OutputStyle::GithubActions => self.show_plain(event),
            OutputStyle::Terminal => self.show_live(event, elapsed),
        }
    }

    fn show_plain(&mut self, event: &ProgressEvent) {
        match event {
            ProgressEvent::Started { name } => {
                let n = self.number(name);
                if self.named.insert(name.clone()) {
                    self.output.line(&format!("#{n} {name}"));
                }
            }
            ProgressEvent::Log { vertex, line } => {
                let n = self.number(vertex);
                self.output.line(&format!("#{n} {line}"));
            }
            ProgressEvent::Finished { name, cached, seconds, error } => {
                let n = self.number(name);
                if self.named.insert(name.clone()) {
                    self.output.line(&format!("#{n} {name}"));
                }
                match (error, cached) {
                    (Some(error), _) => self.output.line(&format!("#{n} ERROR: {error}")),
                    (None, true) => self.output.line(&format!("#{n} CACHED")),
                    (None, false) => self.output.line(&format!("#{n} DONE {:.1}s", seconds.unwrap_or(0.0))),
                }
            }
            ProgressEvent::Text(text) => self.output.line(text),
        }
    }

    fn show_live(&mut self, event: &ProgressEvent, elapsed: f64) {
        match event {
            ProgressEvent::Finished { name, cached, error, .. } => {
                let own_step = self.own_prefixes.iter().any(|prefix| name.starts_with(prefix.as_str()))
                    && !name.contains("] FROM ");
                if own_step {
                    self.steps_done += 1;
                    if *cached {
                        self.steps_cached += 1;
                    }
                }
                if let Some(error) = error {
                    self.clear();
                    self.output.line(&format!("ERROR {name}: {error}"));
                }
            }
            ProgressEvent::Started { name } => self.current = name.clone(),
            ProgressEvent::Text(text) => {
                self.clear();
                self.output.line(text);
            }
            ProgressEvent::Log { .. } => {}
        }
        let mut current: String = self.current.chars().take(60).collect();
        if self.current.chars().count() > 60 {
            current.push('…');
        }
        self.output.live(&format!(
            "\r\x1b[2K[{}] {} steps done, {} cached, {:.1}s  {}",
            self.stage, self.steps_done, self.steps_cached, elapsed, current
        ));
        self.live = true;
    }

    fn clear(&mut self) {
        if self.live {
            self.output.live("\r\x1b[2K");
        }
    }

    pub(crate) fn finish(&mut self, elapsed: f64) {
        if self.style == OutputStyle::Terminal {
            self.clear();
            self.output.line(&format!(
                "[{}] {} steps done, {} cached, {:.1}s",
                self.stage, self.steps_done, self.steps_cached, elapsed
            ));
        }
    }
}
