//! Word expansion as BuildKit's Dockerfile shell lexer does it (moby/buildkit
//! `frontend/dockerfile/shell/lex.go`): quotes, the escape token, `$V`, `${V}`, and every
//! modifier it knows (`:-`, `-`, `:+`, `+`, `:?`, `?`, `#`, `##`, `%`, `%%`, `/`, `//`), nested
//! to any depth. Results are capped at [`MAX_EXPANSION`] bytes, so that no input (`ARG
//! A=${A}${A}` forty times) can take unbounded memory.

use std::collections::BTreeMap;

use anyhow::{bail, Result};

/// The longest result of one expansion.
pub const MAX_EXPANSION: usize = 64 * 1024;

/// The deepest nesting of `${…}` inside `${…}`.
const MAX_DEPTH: usize = 64;

/// Expands `word` with `env` (unset variables expand to nothing), `escape` being the Dockerfile's
/// escape token (`\` unless a `# escape=` directive says otherwise).
pub fn expand(word: &str, env: &BTreeMap<String, String>, escape: char) -> Result<String> {
    let mut lexer = Lexer { chars: word.chars().collect(), pos: 0, env, escape, raw_escapes: false, depth: 0 };
    let out = lexer.process_until(None, false)?;
    Ok(out)
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    env: &'a BTreeMap<String, String>,
    escape: char,
    raw_escapes: bool,
    depth: usize,
}

fn push_capped(out: &mut String, text: &str) -> Result<()> {
    if out.len() + text.len() > MAX_EXPANSION {
        bail!("a variable expansion grows past {} KiB, which cachefrom refuses (an ARG that repeats itself, like ARG A=${{A}}${{A}}?)", MAX_EXPANSION / 1024);
    }
    out.push_str(text);
    Ok(())
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    /// Processes up to `stop` (consumed) or the end; `raw_escapes` keeps escape tokens (patterns).
    fn process_until(&mut self, stop: Option<char>, raw_escapes: bool) -> Result<String> {
        let saved = self.raw_escapes;
        self.raw_escapes = raw_escapes;
        let result = self.process_until_inner(stop);
        self.raw_escapes = saved;
        result
    }

    fn process_until_inner(&mut self, stop: Option<char>) -> Result<String> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                self.next();
                return Ok(out);
            }
            match c {
                '$' => {
                    let value = self.dollar()?;
                    push_capped(&mut out, &value)?;
                }
                '\'' => {
                    let value = self.single_quote()?;
                    push_capped(&mut out, &value)?;
                }
                '"' => {
                    let value = self.double_quote()?;
                    push_capped(&mut out, &value)?;
                }
                _ => {
                    let mut c = self.next().expect("peeked");
                    if c == self.escape {
                        if self.raw_escapes {
                            push_capped(&mut out, &c.to_string())?;
                        }
                        match self.next() {
                            Some(next) => c = next,
                            None => break,
                        }
                    }
                    push_capped(&mut out, &c.to_string())?;
                }
            }
        }
        if let Some(stop) = stop {
            bail!("unexpected end of statement while looking for matching {stop}");
        }
        Ok(out)
    }

    fn single_quote(&mut self) -> Result<String> {
        self.next();
        let mut out = String::new();
        loop {
            match self.next() {
                None => bail!("unexpected end of statement while looking for matching single-quote"),
                Some('\'') => return Ok(out),
                Some(c) => push_capped(&mut out, &c.to_string())?,
            }
        }
    }

    fn double_quote(&mut self) -> Result<String> {
        self.next();
        let mut out = String::new();
        loop {
            match self.peek() {
                None => bail!("unexpected end of statement while looking for matching double-quote"),
                Some('"') => {
                    self.next();
                    return Ok(out);
                }
                Some('$') => {
                    let value = self.dollar()?;
                    push_capped(&mut out, &value)?;
                }
                Some(_) => {
                    let mut c = self.next().expect("peeked");
                    if c == self.escape {
                        if self.raw_escapes {
                            push_capped(&mut out, &c.to_string())?;
                        }
                        match self.peek() {
                            None => continue,
                            Some(next) if next == '"' || next == '$' || next == self.escape => {
                                c = self.next().expect("peeked");
                            }
                            Some(_) => {}
                        }
                    }
                    push_capped(&mut out, &c.to_string())?;
                }
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if name.is_empty() && c.is_numeric() {
                while let Some(digit) = self.peek().filter(|c| c.is_numeric()) {
                    self.next();
                    name.push(digit);
                }
                return name;
            }
            if name.is_empty() && matches!(c, '@' | '*' | '#' | '?' | '-' | '$' | '!' | '0') {
                self.next();
                return c.to_string();
            }
            if !(c.is_alphanumeric() || c == '_') {
                break;
            }
            self.next();
            name.push(c);
        }
        name
    }

    fn get(&self, name: &str) -> Option<&String> {
        self.env.get(name)
    }

    fn dollar(&mut self) -> Result<String> {
        self.next();
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            return Ok(self.get(&name).cloned().unwrap_or_default());
        }
        self.next();
        match self.peek() {
            None => bail!("syntax error: missing '}}'"),
            Some('{' | '}' | ':') => bail!("syntax error: bad substitution"),
            Some(_) => {}
        }
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            bail!("variable expansions nest more than {MAX_DEPTH} deep");
        }
        let result = self.braced();
        self.depth -= 1;
        result
    }

    fn braced(&mut self) -> Result<String> {
        let name = self.name();
        let Some(mut c) = self.next() else { bail!("syntax error: missing '}}'") };
        let mut modifier = c.to_string();
        let mut null_is_unset = false;
        match c {
            '}' => Ok(self.get(&name).cloned().unwrap_or_default()),
            ':' | '+' | '-' | '?' | '#' | '%' => {
                if c == ':' {
                    null_is_unset = true;
                    let Some(next) = self.next() else { bail!("syntax error: missing '}}'") };
                    c = next;
                    modifier.push(c);
                }
                let raw = c == '#' || c == '%';
                if null_is_unset && raw {
                    bail!("unsupported modifier ({modifier}) in substitution");
                }
                if !matches!(c, '+' | '-' | '?' | '#' | '%') {
                    bail!("unsupported modifier ({modifier}) in substitution");
                }
                let word = self.process_until(Some('}'), raw).map_err(|error| self.missing_brace(error))?;
                let value = self.get(&name).cloned();
                let empty = value.as_deref().is_none_or(|value| null_is_unset && value.is_empty());
                match c {
                    '-' => Ok(if empty { word } else { value.unwrap_or_default() }),
                    '+' => Ok(if empty { String::new() } else { word }),
                    '?' => match value {
                        None => bail!("{name}: {}", if word.is_empty() { "is not allowed to be unset" } else { &word }),
                        Some(value) if null_is_unset && value.is_empty() => {
                            bail!("{name}: {}", if word.is_empty() { "is not allowed to be empty" } else { &word })
                        }
                        Some(value) => Ok(value),
                    },
                    _ => {
                        let (greedy, pattern) = match word.strip_prefix(c) {
                            Some(rest) => (true, rest.to_string()),
                            None => (false, word),
                        };
                        let value = value.unwrap_or_default();
                        let pattern = Pattern::parse(&pattern)?;
                        Ok(if c == '%' {
                            pattern.trim_suffix(&value, greedy)
                        } else {
                            pattern.trim_prefix(&value, greedy)
                        })
                    }
                }
            }
            '/' => {
                let all = self.peek() == Some('/');
                if all {
                    self.next();
                }
                let pattern = self.process_until(Some('/'), true).map_err(|error| self.missing_brace(error))?;
                let replacement = self.process_until(Some('}'), true).map_err(|error| self.missing_brace(error))?;
                let value = self.get(&name).cloned().unwrap_or_default();
                let pattern = Pattern::parse(&pattern)?;
                pattern.replace(&value, &replacement, all)
            }
            _ => bail!("unsupported modifier ({modifier}) in substitution"),
        }
    }

    fn missing_brace(&self, error: anyhow::Error) -> anyhow::Error {
        if self.peek().is_none() && error.to_string().starts_with("unexpected end") {
            anyhow::anyhow!("syntax error: missing '}}'")
        } else {
            error
        }
    }
}

/// A shell pattern as BuildKit reads it: `*`, `?`, `\` escapes, no bracket expressions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    Any,
    Star,
}

#[derive(Debug, Clone)]
struct Pattern(Vec<Token>);

impl Pattern {
    fn parse(text: &str) -> Result<Pattern> {
        let mut tokens = Vec::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => tokens.push(Token::Star),
                '?' => tokens.push(Token::Any),
                '\\' => match chars.peek() {
                    Some('}' | '/') => {}
                    Some('*' | '?' | '\\') => tokens.push(Token::Literal(chars.next().expect("peeked"))),
                    Some(other) => bail!("invalid pattern ({text}) in substitution: invalid escape '\\{other}'"),
                    None => bail!("invalid pattern ({text}) in substitution: trailing backslash"),
                },
                c => tokens.push(Token::Literal(c)),
            }
        }
        Ok(Pattern(tokens))
    }

    /// States reachable after the empty prefix of the tokens starting at `state` (stars may match nothing).
    fn closure(&self, states: &mut [bool], state: usize) {
        let mut state = state;
        loop {
            if states[state] {
                return;
            }
            states[state] = true;
            if self.0.get(state) == Some(&Token::Star) {
                state += 1;
            } else {
                return;
            }
        }
    }

    fn step(&self, current: &[bool], c: char) -> Vec<bool> {
        let mut next = vec![false; self.0.len() + 1];
        for (state, on) in current.iter().enumerate() {
            if !on {
                continue;
            }
            match self.0.get(state) {
                Some(Token::Star) => self.closure(&mut next, state),
                Some(Token::Any) => self.closure(&mut next, state + 1),
                Some(Token::Literal(l)) if *l == c => self.closure(&mut next, state + 1),
                _ => {}
            }
        }
        next
    }

    /// The lengths of the prefixes of `chars` the whole pattern matches: shortest, longest.
    fn prefix_matches(&self, chars: &[char]) -> (Option<usize>, Option<usize>) {
        let accept = self.0.len();
        let mut current = vec![false; accept + 1];
        self.closure(&mut current, 0);
        let (mut shortest, mut longest) = (None, None);
        if current[accept] {
            shortest = Some(0);
            longest = Some(0);
        }
        for (i, c) in chars.iter().enumerate() {
            current = self.step(&current, *c);
            if !current.iter().any(|on| *on) {
                break;
            }
            if current[accept] {
                shortest = shortest.or(Some(i + 1));
                longest = Some(i + 1);
            }
        }
        (shortest, longest)
    }

    fn trim_prefix(&self, value: &str, greedy: bool) -> String {
        let chars: Vec<char> = value.chars().collect();
        let (shortest, longest) = self.prefix_matches(&chars);
        match if greedy { longest } else { shortest } {
            Some(n) => chars[n..].iter().collect(),
            None => value.to_string(),
        }
    }

    fn trim_suffix(&self, value: &str, greedy: bool) -> String {
        let reversed = Pattern(self.0.iter().rev().cloned().collect());
        let chars: Vec<char> = value.chars().rev().collect();
        let (shortest, longest) = reversed.prefix_matches(&chars);
        match if greedy { longest } else { shortest } {
            Some(n) => chars[n..].iter().rev().collect(),
            None => value.to_string(),
        }
    }

    /// The leftmost match at or after `from`, longest there: (start, end) in chars.
    fn find(&self, chars: &[char], from: usize) -> Option<(usize, usize)> {
        // One pass: each state keeps the earliest start that reaches it.
        let accept = self.0.len();
        let mut starts: Vec<Option<usize>> = vec![None; accept + 1];
        let mut best: Option<(usize, usize)> = None;
        for position in from..=chars.len() {
            if best.is_none() {
                let mut injected = vec![false; accept + 1];
                self.closure(&mut injected, 0);
                for (state, on) in injected.iter().enumerate() {
                    if *on && starts[state].is_none() {
                        starts[state] = Some(position);
                    }
                }
            }
            if let Some(start) = starts[accept] {
                match best {
                    Some((best_start, _)) if best_start < start => {}
                    _ => best = Some((start, position)),
                }
            }
            let Some(c) = chars.get(position) else { break };
            let mut next: Vec<Option<usize>> = vec![None; accept + 1];
            for (state, start) in starts.iter().enumerate() {
                let Some(start) = start else { continue };
                if best.is_some_and(|(best_start, _)| *start != best_start) {
                    continue;
                }
                let mut single = vec![false; accept + 1];
                single[state] = true;
                for (target, on) in self.step(&single, *c).iter().enumerate() {
                    if *on && next[target].is_none_or(|existing| *start < existing) {
                        next[target] = Some(*start);
                    }
                }
            }
            starts = next;
            if best.is_some() && starts.iter().all(Option::is_none) {
                break;
            }
        }
        best
    }

    fn replace(&self, value: &str, replacement: &str, all: bool) -> Result<String> {
        let chars: Vec<char> = value.chars().collect();
        let mut out = String::new();
        let mut position = 0;
        let mut last_match_end: Option<usize> = None;
        while position <= chars.len() {
            let Some((start, end)) = self.find(&chars, position) else { break };
            // Like Go's ReplaceAll: an empty match right after a match does not count.
            if start == end && last_match_end == Some(start) {
                if start >= chars.len() {
                    break;
                }
                out.extend(&chars[position..=start]);
                position = start + 1;
                continue;
            }
            out.extend(&chars[position..start]);
            push_capped(&mut out, replacement)?;
            last_match_end = Some(end);
            if end == start {
                if let Some(c) = chars.get(end) {
                    out.push(*c);
                }
                position = end + 1;
            } else {
                position = end;
            }
            if !all {
                break;
            }
        }
        if position < chars.len() {
            out.extend(&chars[position..]);
        }
        if out.len() > MAX_EXPANSION {
            push_capped(&mut String::new(), &out)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn env() -> BTreeMap<String, String> {
        [("V", "1.2.3"), ("D", "dflt"), ("E", ""), ("P", "a/b/c.tar.gz"), ("X", "x")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn ex(word: &str) -> String {
        expand(word, &env(), '\\').unwrap()
    }

    #[test]
    fn the_forms_buildkits_lexer_knows() {
        let cases = [
            ("$V", "1.2.3"),
            ("${V}", "1.2.3"),
            ("${U:-${D}}", "dflt"),
            ("${U:-${U2:-deep-${D}}}", "deep-dflt"),
            ("${E:-x}", "x"),
            ("${E-x}", ""),
            ("${V:+set}", "set"),
            ("${E+set}", "set"),
            ("${E:+set}", ""),
            ("${U+set}", ""),
            ("${V%.*}", "1.2"),
            ("${V%%.*}", "1"),
            ("${V#*.}", "2.3"),
            ("${V##*.}", "3"),
            ("${P%/*}", "a/b"),
            ("${P##*/}", "c.tar.gz"),
            ("${V/./-}", "1-2.3"),
            ("${V//./-}", "1-2-3"),
            ("${P//\\//_}", "a_b_c.tar.gz"),
            ("${V/#1/one}", "1.2.3"),
            ("${V/?/N}", "N.2.3"),
            ("\"$V\"-'$V'", "1.2.3-$V"),
            ("a\\$V", "a$V"),
            ("$", "$"),
            ("${V:?must}", "1.2.3"),
            ("img:${V%.*}-${X}", "img:1.2-x"),
        ];
        for (word, expected) in cases {
            assert_eq!(ex(word), expected, "{word}");
        }
    }

    #[test]
    fn errors_like_buildkits() {
        let env = env();
        for (word, expected) in [
            ("${U:?}", "U: is not allowed to be unset"),
            ("${E:?}", "E: is not allowed to be empty"),
            ("${U?gone}", "U: gone"),
            ("${V", "missing '}'"),
            ("${}", "bad substitution"),
            ("${V:%x}", "unsupported modifier"),
            ("${V!x}", "unsupported modifier"),
            ("'open", "single-quote"),
        ] {
            let error = expand(word, &env, '\\').unwrap_err().to_string();
            assert!(error.contains(expected), "{word}: {error}");
        }
    }

    #[test]
    fn the_escape_directive_changes_the_escape_token() {
        assert_eq!(expand("a`$V", &env(), '`').unwrap(), "a$V");
        assert_eq!(expand("a\\$V", &env(), '`').unwrap(), "a\\1.2.3");
    }

    #[test]
    fn doubling_is_capped() {
        let mut env = BTreeMap::new();
        env.insert("A".to_string(), "x".repeat(40_000));
        let error = expand("${A}${A}", &env, '\\').unwrap_err().to_string();
        assert!(error.contains("KiB"), "{error}");
    }

    proptest! {
        #[test]
        fn any_word_is_answered_and_bounded(word in ".{0,200}") {
            let mut env = env();
            env.insert("BIG".into(), "y".repeat(MAX_EXPANSION / 2));
            if let Ok(out) = expand(&word, &env, '\\') {
                prop_assert!(out.len() <= MAX_EXPANSION);
            }
        }

        #[test]
        fn plain_words_are_kept(word in "[a-z0-9./:@_-]{0,40}") {
            prop_assert_eq!(ex(&word), word);
        }
    }
}
