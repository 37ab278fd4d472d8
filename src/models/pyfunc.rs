//! The MLflow `python_function` flavor of a bundle: the files that let
//! `mlflow.pyfunc.load_model` (and `mlflow models serve`) load a bundle from MLflow, or from its
//! directory.
//!
//! - `MLmodel`: the flavor, whose loader module is `sentiflow_pyfunc.py` in the bundle itself;
//! - `sentiflow_pyfunc.py`: scores TF-IDF bundles with NumPy and SciPy, BERT bundles with ONNX
//!   Runtime and `tokenizers`, to the same probabilities as sentiflow;
//! - `text_rules.json`: what the loader needs to see texts exactly as `crate::text` does: the
//!   characters of tokens and of whitespace, as Rust classifies them, and the HTML entities that
//!   normalisation decodes;
//! - `requirements.txt` and `python_env.yaml`: the environment MLflow builds to serve the model.

use std::path::Path;

use serde::Serialize;

use super::bundle::FORMAT;
use crate::text::is_word_char;

const LOADER: &str = include_str!("sentiflow_pyfunc.py");

/// The Python version MLflow's virtualenv manager installs to serve a bundle.
const PYTHON: &str = "3.11";

/// `text_rules.json`.
#[derive(Serialize)]
struct TextRules {
    /// Inclusive code point ranges.
    word_chars: Vec<[u32; 2]>,
    whitespace: Vec<[u32; 2]>,
    /// Name (without `&` and `;`) → text.
    entities: serde_json::Map<String, serde_json::Value>,
}

/// Inclusive ranges of the code points for which `keep` holds.
fn ranges(keep: impl Fn(char) -> bool) -> Vec<[u32; 2]> {
    let mut out: Vec<[u32; 2]> = Vec::new();
    for c in (0..=char::MAX as u32).filter_map(char::from_u32).filter(|&c| keep(c)) {
        let code = c as u32;
        match out.last_mut() {
            Some(last) if last[1] + 1 == code => last[1] = code,
            _ => out.push([code, code]),
        }
    }
    out
}

fn text_rules() -> TextRules {
    TextRules {
        word_chars: ranges(is_word_char),
        whitespace: ranges(char::is_whitespace),
        entities: html_escape::NAMED_ENTITIES
            .iter()
            .map(|(name, text)| (String::from_utf8_lossy(name).into_owned(), (*text).into()))
            .collect(),
    }
}

/// What the loader imports, by bundle kind.
fn requirements(kind: &str) -> &'static str {
    match kind {
        "bert" => "numpy>=1.24\npandas>=1.5\nonnxruntime>=1.17\ntokenizers>=0.15\n",
        _ => "numpy>=1.24\npandas>=1.5\nscipy>=1.10\n",
    }
}

fn mlmodel(kind: &str) -> String {
    format!(
        "flavors:
  python_function:
    loader_module: sentiflow_pyfunc
    code: .
    data: .
    env:
      virtualenv: python_env.yaml
    python_version: '{PYTHON}'
  sentiflow:
    format: {FORMAT}
    kind: {kind}
"
    )
}

/// Writes the flavor's files for a bundle of `kind` (`tfidf` or `bert`) into `dir`.
pub fn write(dir: &Path, kind: &str) -> std::io::Result<()> {
    let env = format!(
        "python: '{PYTHON}'\nbuild_dependencies:\n  - pip\n  - setuptools\n  - wheel\ndependencies:\n  - -r requirements.txt\n"
    );
    std::fs::write(dir.join("MLmodel"), mlmodel(kind))?;
    std::fs::write(dir.join("sentiflow_pyfunc.py"), LOADER)?;
    std::fs::write(dir.join("requirements.txt"), requirements(kind))?;
    std::fs::write(dir.join("python_env.yaml"), env)?;
    // BERT bundles take raw texts: their tokenizer normalises.
    if kind == "tfidf" {
        let rules = serde_json::to_vec(&text_rules()).expect("text rules serialize");
        std::fs::write(dir.join("text_rules.json"), rules)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_rules_describe_rust_character_classes() {
        let rules = text_rules();
        let inside = |ranges: &[[u32; 2]], c: char| ranges.iter().any(|r| (r[0]..=r[1]).contains(&(c as u32)));
        for c in ['a', 'Z', '0', '_', 'é', '٣', 'ⅷ'] {
            assert!(inside(&rules.word_chars, c), "{c}");
        }
        for c in [' ', '-', '\'', '<'] {
            assert!(!inside(&rules.word_chars, c), "{c}");
        }
        assert!(inside(&rules.whitespace, '\u{3000}') && !inside(&rules.whitespace, '\u{1c}'));
        assert_eq!(rules.entities["amp"], "&");
        assert_eq!(rules.entities["hellip"], "\u{2026}");
    }
}
