//! Diagnostics: what is wrong in a pipeline file, where, and how to fix it.

use std::fmt;
use std::path::{Path, PathBuf};

use super::yaml::Pos;

/// One problem found in a pipeline file, with its `file:line:col`.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub pos: Pos,
    pub message: String,
    pub hint: Option<String>,
    /// The name, when the problem is an override of a parameter the pipeline does not declare:
    /// a caller that takes overrides from users answers that as "not found".
    pub unknown_parameter: Option<String>,
}

impl Diagnostic {
    pub fn new(file: &Path, pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_path_buf(),
            pos,
            message: message.into(),
            hint: None,
            unknown_parameter: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Renders the diagnostic with the offending source line and a caret under the column.
    pub fn render(&self, source: Option<&str>) -> String {
        let mut out = format!("error: {self}\n");
        if let Some(line) = source.and_then(|s| s.lines().nth(self.pos.line.saturating_sub(1))) {
            let number = self.pos.line.to_string();
            let pad = " ".repeat(number.len());
            let caret = " ".repeat(self.pos.col.saturating_sub(1));
            out.push_str(&format!("{pad} |\n{number} | {line}\n{pad} | {caret}^\n"));
        }
        if let Some(hint) = &self.hint {
            out.push_str(&format!("  = hint: {hint}\n"));
        }
        out
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.pos.line,
            self.pos.col,
            self.message
        )
    }
}

/// All problems found in one pipeline file.
#[derive(Debug, thiserror::Error)]
pub struct Diagnostics {
    pub items: Vec<Diagnostic>,
    pub text: Option<String>,
}

impl Diagnostics {
    pub fn one(d: Diagnostic, source: Option<&str>) -> Self {
        Diagnostics {
            items: vec![d],
            text: source.map(str::to_string),
        }
    }

    pub fn render(&self) -> String {
        self.items.iter().map(|d| d.render(self.text.as_deref())).collect()
    }

    /// The first override of an undeclared parameter among the problems: its name and problem.
    pub fn unknown_parameter(&self) -> Option<(&str, &Diagnostic)> {
        self.items
            .iter()
            .find_map(|d| Some((d.unknown_parameter.as_deref()?, d)))
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.items.iter().map(|d| d.to_string()).collect();
        f.write_str(&lines.join("\n"))
    }
}

/// The candidate most like `word`, if it is alike enough to be a likely typo: Jaro-Winkler
/// similarity above 0.7, as clap judges mistyped flags.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score > 0.7)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

/// "did you mean `x`? " when some candidate is like `word`, else nothing.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    closest(word, candidates).map_or(String::new(), |c| format!("did you mean `{c}`? "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_word_and_strangers_nothing() {
        assert_eq!(closest("need", ["uses", "needs", "with"]), Some("needs"));
        assert_eq!(closest("adress", ["addr", "db", "pipelines"]), Some("addr"));
        assert_eq!(closest("vectorise", ["vectorize", "tune"]), Some("vectorize"));
        assert_eq!(closest("banana", ["uses", "needs", "with"]), None);
        assert_eq!(did_you_mean("sed", ["seed", "data"]), "did you mean `seed`? ");
    }
}
