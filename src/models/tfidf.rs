//! TF-IDF over word n-grams, with scikit-learn's conventions (smoothed idf, sublinear tf, l2
//! norm, alphabetical vocabulary) and parallel over documents.
//!
//! N-grams are counted as packed token ids rather than strings, which keeps fitting 1–3-grams on
//! IMDB within a few hundred megabytes.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::sparse::{read_vec, write_slice, Csr};
use crate::text::{normalize, Tokenizer, DEFAULT_TOKEN_PATTERN};

/// Vectorizer settings (the `with:` of a `vectorize` stage).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TfidfConfig {
    /// Smallest and largest n-gram length, each in 1..=3.
    #[serde(default = "default_ngram")]
    pub ngram: [usize; 2],
    /// Keep terms found in at least this many training documents.
    #[serde(default = "default_min_df")]
    pub min_df: u32,
    /// Drop terms found in more than this fraction of training documents.
    #[serde(default = "default_max_df")]
    pub max_df: f64,
    /// Keep only the most frequent terms.
    #[serde(default)]
    pub max_features: Option<usize>,
    /// Use 1 + ln(tf) instead of tf.
    #[serde(default = "yes")]
    pub sublinear_tf: bool,
    /// Count each term once per document.
    #[serde(default)]
    pub binary: bool,
    /// Weight terms by their smoothed inverse document frequency; off, every weight is 1 (plain
    /// or binary counts, as NB-SVM on binarised n-grams uses them).
    #[serde(default = "yes")]
    pub use_idf: bool,
    /// Lowercase texts before tokenising.
    #[serde(default = "yes")]
    pub lowercase: bool,
    /// Scale each row to unit length.
    #[serde(default = "yes")]
    pub l2_norm: bool,
    /// Regular expression whose matches are tokens.
    #[serde(default = "default_pattern")]
    pub token_pattern: String,
}

fn default_ngram() -> [usize; 2] {
    [1, 2]
}
fn default_min_df() -> u32 {
    2
}
fn default_max_df() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn default_pattern() -> String {
    DEFAULT_TOKEN_PATTERN.to_string()
}

impl Default for TfidfConfig {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("defaults deserialize")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TfidfError {
    #[error("invalid vectorizer setting: {0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no term is left in the vocabulary (min_df {min_df}, max_df {max_df}, {docs} documents)")]
    EmptyVocabulary { min_df: u32, max_df: f64, docs: usize },
}

const ID_BITS: u32 = 21;
const MAX_ID: u32 = (1 << ID_BITS) - 1;

/// A fitted vectorizer.
#[derive(Debug)]
pub struct Tfidf {
    pub config: TfidfConfig,
    tokenizer: Tokenizer,
    /// Token → id, ids from 1 (0 marks "no token" in a packed n-gram).
    unigrams: FxHashMap<String, u32>,
    /// Id → token (`names[0]` is unused).
    names: Vec<String>,
    /// Packed n-gram → column.
    index: FxHashMap<u64, u32>,
    /// Column → packed n-gram.
    keys: Vec<u64>,
    pub idf: Vec<f32>,
}

fn pack(ids: &[u32]) -> u64 {
    ids.iter()
        .enumerate()
        .fold(0u64, |k, (i, &id)| k | (id as u64) << (ID_BITS * i as u32))
}

/// Packed n-grams of a document's token ids, for n in `lo..=hi`. Id 0 (unknown token) poisons
/// every n-gram containing it.
fn ngrams(ids: &[u32], lo: usize, hi: usize, out: &mut Vec<u64>) {
    out.clear();
    for n in lo..=hi {
        for w in ids.windows(n) {
            if w.iter().all(|&id| id != 0) {
                out.push(pack(w));
            }
        }
    }
}

impl TfidfConfig {
    fn check(&self) -> Result<Tokenizer, TfidfError> {
        let [lo, hi] = self.ngram;
        if !(1..=3).contains(&lo) || !(lo..=3).contains(&hi) {
            return Err(TfidfError::Config(format!(
                "ngram [{lo}, {hi}]: lengths must satisfy 1 <= min <= max <= 3"
            )));
        }
        if !(0.0..=1.0).contains(&self.max_df) || self.max_df == 0.0 {
            return Err(TfidfError::Config(format!("max_df {}: must be in (0, 1]", self.max_df)));
        }
        Tokenizer::new(&self.token_pattern).map_err(|e| TfidfError::Config(format!("token_pattern: {e}")))
    }
}

impl Tfidf {
    /// Fits the vocabulary and idf on `texts` and returns their matrix.
    pub fn fit_transform(config: &TfidfConfig, texts: &[String]) -> Result<(Tfidf, Csr), TfidfError> {
        let tokenizer = config.check()?;
        let [lo, hi] = config.ngram;
        let clock = std::time::Instant::now();
        let normalized: Vec<String> = texts.par_iter().map(|t| normalize(t, config.lowercase)).collect();
        let tokens: Vec<Vec<&str>> = normalized
            .par_iter()
            .map(|t| {
                let mut v = Vec::new();
                tokenizer.tokens(t, &mut v);
                v
            })
            .collect();
        // Distinct tokens per slice of documents in parallel, then ids in first-seen order.
        let slice = tokens.len().div_ceil(rayon::current_num_threads()).max(1);
        let distinct: Vec<Vec<&str>> = tokens
            .par_chunks(slice)
            .map(|docs| {
                let mut seen: FxHashMap<&str, ()> = FxHashMap::default();
                let mut order = Vec::new();
                for &t in docs.iter().flatten() {
                    if seen.insert(t, ()).is_none() {
                        order.push(t);
                    }
                }
                order
            })
            .collect();
        let mut unigrams: FxHashMap<&str, u32> = FxHashMap::default();
        let mut names: Vec<&str> = vec![""];
        for t in distinct.into_iter().flatten() {
            if let std::collections::hash_map::Entry::Vacant(e) = unigrams.entry(t) {
                e.insert(names.len() as u32);
                names.push(t);
            }
        }
        if names.len() as u32 > MAX_ID {
            return Err(TfidfError::Config(format!(
                "more than {MAX_ID} distinct tokens; use a stricter token_pattern"
            )));
        }
        let ids: Vec<Vec<u32>> = tokens
            .par_iter()
            .map(|d| d.iter().map(|t| unigrams[t]).collect())
            .collect();
        // Document and total frequency of every n-gram.
        // One map per worker, sized up front: growing a map of a million n-grams is costly.
        let expected = (ids.iter().map(Vec::len).sum::<usize>() * (hi - lo + 1) / 4).max(1024);
        let counts: FxHashMap<u64, (u32, u64)> = ids
            .par_chunks(slice)
            .fold(
                || FxHashMap::with_capacity_and_hasher(expected / rayon::current_num_threads(), Default::default()),
                |mut local: FxHashMap<u64, (u32, u64)>, chunk| {
                    let mut keys = Vec::new();
                    for doc in chunk {
                        ngrams(doc, lo, hi, &mut keys);
                        keys.sort_unstable();
                        for run in keys.chunk_by(|a, b| a == b) {
                            let e = local.entry(run[0]).or_default();
                            e.0 += 1;
                            e.1 += run.len() as u64;
                        }
                    }
                    local
                },
            )
            .reduce(FxHashMap::default, |a, b| {
                let (small, mut big) = if a.len() < b.len() { (a, b) } else { (b, a) };
                for (k, (df, tf)) in small {
                    let e = big.entry(k).or_default();
                    e.0 += df;
                    e.1 += tf;
                }
                big
            });
        tracing::debug!("counted {} distinct n-grams in {:?}", counts.len(), clock.elapsed());
        let n_docs = texts.len();
        let max_df = (config.max_df * n_docs as f64).floor() as u32;
        let term_of = |k: u64| -> String { unpack(k).map(|id| names[id as usize]).collect::<Vec<_>>().join(" ") };
        let mut kept: Vec<(u64, u32, u64)> = counts
            .into_iter()
            .filter(|(_, (df, _))| *df >= config.min_df && *df <= max_df)
            .map(|(k, (df, tf))| (k, df, tf))
            .collect();
        if let Some(max) = config.max_features {
            // Most frequent first; ties broken by term so the choice is deterministic.
            kept.par_sort_unstable_by(|a, b| b.2.cmp(&a.2).then_with(|| term_of(a.0).cmp(&term_of(b.0))));
            kept.truncate(max);
        }
        let mut vocab: Vec<(String, u64, u32)> = kept.into_par_iter().map(|(k, df, _)| (term_of(k), k, df)).collect();
        vocab.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
        if vocab.is_empty() {
            return Err(TfidfError::EmptyVocabulary {
                min_df: config.min_df,
                max_df: config.max_df,
                docs: n_docs,
            });
        }
        let index: FxHashMap<u64, u32> = vocab.iter().enumerate().map(|(c, (_, k, _))| (*k, c as u32)).collect();
        let idf: Vec<f32> = vocab
            .iter()
            .map(|(_, _, df)| match config.use_idf {
                true => (((1 + n_docs) as f64 / (1 + *df) as f64).ln() + 1.0) as f32,
                false => 1.0,
            })
            .collect();
        let keys: Vec<u64> = vocab.into_iter().map(|(_, k, _)| k).collect();
        let owned_unigrams: FxHashMap<String, u32> = unigrams.iter().map(|(k, v)| (k.to_string(), *v)).collect();

        let model = Tfidf {
            config: config.clone(),
            tokenizer,
            unigrams: owned_unigrams,
            names: names.iter().map(|s| s.to_string()).collect(),
            index,
            keys,
            idf,
        };
        let rows = ids.par_iter().map(|doc| model.row_from_ids(doc)).collect();
        let cols = model.keys.len();
        let m = Csr::from_rows(cols, rows);
        tracing::debug!("fitted and transformed in {:?}", clock.elapsed());
        Ok((model, m))
    }

    pub fn vocabulary_size(&self) -> usize {
        self.keys.len()
    }

    /// The term of column `col`: its tokens joined by a space.
    pub fn term(&self, col: usize) -> String {
        unpack(self.keys[col])
            .map(|id| self.names[id as usize].as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// One document's TF-IDF row from its token ids, sorted by column.
    fn row_from_ids(&self, ids: &[u32]) -> Vec<(u32, f32)> {
        let [lo, hi] = self.config.ngram;
        let mut keys = Vec::new();
        ngrams(ids, lo, hi, &mut keys);
        let mut cols: Vec<u32> = keys.iter().filter_map(|k| self.index.get(k).copied()).collect();
        cols.sort_unstable();
        let mut row: Vec<(u32, f32)> = cols
            .chunk_by(|a, b| a == b)
            .map(|run| {
                let tf = if self.config.binary {
                    1.0
                } else if self.config.sublinear_tf {
                    1.0 + (run.len() as f64).ln()
                } else {
                    run.len() as f64
                };
                (run[0], (tf * self.idf[run[0] as usize] as f64) as f32)
            })
            .collect();
        if self.config.l2_norm {
            let norm = row.iter().map(|(_, v)| (*v as f64) * (*v as f64)).sum::<f64>().sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|(_, v)| *v = (*v as f64 / norm) as f32);
            }
        }
        row
    }

    /// Token ids of a raw text (tokens outside the vocabulary get id 0), and the length of the
    /// normalised text in characters.
    fn ids(&self, text: &str) -> (Vec<u32>, usize) {
        let normalized = normalize(text, self.config.lowercase);
        let mut tokens = Vec::new();
        self.tokenizer.tokens(&normalized, &mut tokens);
        let ids = tokens
            .iter()
            .map(|t| self.unigrams.get(*t).copied().unwrap_or(0))
            .collect();
        (ids, normalized.chars().count())
    }

    /// The TF-IDF row of one text.
    pub fn transform_one(&self, text: &str) -> Vec<(u32, f32)> {
        self.row_from_ids(&self.ids(text).0)
    }

    /// The TF-IDF row of one text, with what drift monitoring measures of it: the normalised
    /// text's length in characters, its tokens outside the vocabulary, and all its tokens.
    pub fn transform_counting(&self, text: &str) -> (Vec<(u32, f32)>, [usize; 3]) {
        let (ids, chars) = self.ids(text);
        let unknown = ids.iter().filter(|&&id| id == 0).count();
        (self.row_from_ids(&ids), [chars, unknown, ids.len()])
    }

    pub fn transform(&self, texts: &[String]) -> Csr {
        let rows = texts.par_iter().map(|t| self.transform_one(t)).collect();
        Csr::from_rows(self.keys.len(), rows)
    }

    /// Writes `vectorizer.json`, `unigrams.txt` (one token per line, by id), `ngrams.bin` (each
    /// column's packed token ids, u64 LE), `idf.bin` (f32 LE) and, for people, `terms.txt` (one
    /// term per line, in column order). Loading reads all but `terms.txt`.
    pub fn save(&self, dir: &Path) -> Result<(), TfidfError> {
        std::fs::create_dir_all(dir).map_err(io_at(dir))?;
        let config = serde_json::to_vec_pretty(&self.config).expect("config serializes");
        write_file(&dir.join("vectorizer.json"), |w| w.write_all(&config))?;
        write_file(&dir.join("unigrams.txt"), |w| {
            self.names[1..].iter().try_for_each(|n| writeln!(w, "{n}"))
        })?;
        write_file(&dir.join("terms.txt"), |w| {
            (0..self.keys.len()).try_for_each(|c| writeln!(w, "{}", self.term(c)))
        })?;
        write_file(&dir.join("ngrams.bin"), |w| {
            write_slice(w, &self.keys, |x| x.to_le_bytes())
        })?;
        write_file(&dir.join("idf.bin"), |w| write_slice(w, &self.idf, |x| x.to_le_bytes()))
    }

    pub fn load(dir: &Path) -> Result<Tfidf, TfidfError> {
        let path = dir.join("vectorizer.json");
        let config: TfidfConfig = serde_json::from_slice(&std::fs::read(&path).map_err(io_at(&path))?)
            .map_err(|e| TfidfError::Config(format!("{}: {e}", path.display())))?;
        let tokenizer = config.check()?;
        let path = dir.join("unigrams.txt");
        let mut names = vec![String::new()];
        for line in BufReader::new(std::fs::File::open(&path).map_err(io_at(&path))?).lines() {
            names.push(line.map_err(io_at(&path))?);
        }
        let unigrams: FxHashMap<String, u32> = names
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, n)| (n.clone(), i as u32))
            .collect();
        let path = dir.join("ngrams.bin");
        let bytes = std::fs::read(&path).map_err(io_at(&path))?;
        let keys: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let path = dir.join("idf.bin");
        let mut f = BufReader::new(std::fs::File::open(&path).map_err(io_at(&path))?);
        let idf = read_vec(&mut f, keys.len(), f32::from_le_bytes).map_err(io_at(&path))?;
        let index: FxHashMap<u64, u32> = keys.iter().enumerate().map(|(c, &k)| (k, c as u32)).collect();
        Ok(Tfidf {
            config,
            tokenizer,
            unigrams,
            names,
            index,
            keys,
            idf,
        })
    }
}

fn io_at(path: &Path) -> impl Fn(std::io::Error) -> TfidfError + '_ {
    move |source| TfidfError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a file through a buffer, reporting errors with its path.
fn write_file(
    path: &Path,
    body: impl FnOnce(&mut BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<(), TfidfError> {
    let mut w = BufWriter::new(std::fs::File::create(path).map_err(io_at(path))?);
    body(&mut w).and_then(|_| w.flush()).map_err(io_at(path))
}

/// The token ids packed in an n-gram key.
fn unpack(key: u64) -> impl Iterator<Item = u32> {
    (0..3)
        .map(move |i| ((key >> (ID_BITS * i)) & MAX_ID as u64) as u32)
        .take_while(|&id| id != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs() -> Vec<String> {
        [
            "A good film. Good acting!",
            "A bad film, bad plot.",
            "good plot<br />and good film",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn matches_scikit_learn_conventions() {
        let cfg = TfidfConfig {
            ngram: [1, 2],
            min_df: 1,
            sublinear_tf: false,
            ..TfidfConfig::default()
        };
        let (v, m) = Tfidf::fit_transform(&cfg, &docs()).unwrap();
        // Alphabetical vocabulary of uni- and bigrams; single letters are not tokens.
        let terms: Vec<String> = (0..v.vocabulary_size()).map(|c| v.term(c)).collect();
        assert_eq!(&terms[..4], &["acting", "and", "and good", "bad"]);
        let col = |t: &str| terms.iter().position(|x| x == t).unwrap();
        // idf = ln((1+n)/(1+df)) + 1: "film" is in all 3 documents.
        assert!((v.idf[col("film")] - 1.0).abs() < 1e-6);
        assert!((v.idf[col("bad")] - ((4.0f64 / 2.0).ln() + 1.0) as f32).abs() < 1e-6);
        for i in 0..m.rows() {
            assert!((m.row_sq_norm(i) - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn saved_vectorizers_transform_identically() {
        let cfg = TfidfConfig {
            ngram: [1, 3],
            min_df: 1,
            ..TfidfConfig::default()
        };
        let (v, m) = Tfidf::fit_transform(&cfg, &docs()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        v.save(dir.path()).unwrap();
        let loaded = Tfidf::load(dir.path()).unwrap();
        assert_eq!(loaded.transform(&docs()), m);
        assert_eq!(v.transform(&docs()), m);
        // Unknown words are ignored, not errors.
        assert!(loaded.transform_one("zzz qqq").is_empty());
    }

    #[test]
    fn rejects_bad_settings_and_empty_vocabularies() {
        let bad = TfidfConfig {
            ngram: [2, 1],
            ..TfidfConfig::default()
        };
        assert!(matches!(
            Tfidf::fit_transform(&bad, &docs()),
            Err(TfidfError::Config(_))
        ));
        let strict = TfidfConfig {
            min_df: 10,
            ..TfidfConfig::default()
        };
        assert!(matches!(
            Tfidf::fit_transform(&strict, &docs()),
            Err(TfidfError::EmptyVocabulary { .. })
        ));
    }
}
