//! BERT-family classifiers exported to ONNX (`stages/bert/export_onnx.py`), run with ONNX Runtime
//! through `ort` and tokenized with `tokenizers`.
//!
//! ONNX Runtime is loaded at run time (`load-dynamic`): from `ORT_DYLIB_PATH`, else from the
//! `onnxruntime` wheel of a Python environment nearby, else from the system library paths.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Mutex, OnceLock};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::Tensor;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::drift::Sample;
use crate::text::normalize;

/// The ONNX model's inputs, in the order `export_onnx.py` declares them.
const INPUTS: [&str; 3] = ["input_ids", "attention_mask", "token_type_ids"];

/// Texts in one forward pass at most, whatever the caller gives: attention memory grows with
/// the batch, and beyond this the throughput does not.
const MAX_PASS: usize = 64;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BertError {
    #[error(
        "ONNX Runtime is not installed: no libonnxruntime.so found (looked in {searched}). \
         Install it with `pip install onnxruntime` (scripts/setup-python does) or set ORT_DYLIB_PATH \
         to the library file, e.g. .venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.32.0"
    )]
    RuntimeMissing { searched: String },
    #[error("ONNX Runtime at {path} cannot be used: {reason}")]
    RuntimeBroken { path: String, reason: String },
    #[error("{path}: {reason}")]
    Model { path: String, reason: String },
    #[error(
        "cannot run on {device}: {reason}. The CUDA execution provider needs ONNX Runtime's GPU build \
         (the onnxruntime-gpu wheel: point ORT_DYLIB_PATH at its libonnxruntime.so) and the CUDA 13 and \
         cuDNN 9 libraries on LD_LIBRARY_PATH"
    )]
    Device { device: Device, reason: String },
    #[error("ONNX Runtime failed: {0}")]
    Inference(String),
}

/// Which tokens of a review longer than `max_length` the model sees (besides [CLS] and [SEP]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// The first tokens.
    #[default]
    Head,
    /// The first quarter and the last three quarters, best on IMDB in Sun et al. 2019, "How to
    /// Fine-Tune BERT for Text Classification?".
    HeadTail,
}

impl Truncation {
    /// The setting's name, as pipelines and `stages/bert/*.py` write it.
    pub fn name(self) -> &'static str {
        match self {
            Truncation::Head => "head",
            Truncation::HeadTail => "head_tail",
        }
    }

    /// Cuts `ids` to at most `budget` tokens, in order. The head is `budget / 4` rounded half up
    /// in integers, as `stages/bert/*.py` compute it (128 of 510, 32 of 126).
    pub fn apply(self, ids: &mut Vec<u32>, budget: usize) {
        if ids.len() > budget {
            let head = match self {
                Truncation::Head => budget,
                Truncation::HeadTail => (budget + 2) / 4,
            };
            ids.drain(head..ids.len() - (budget - head));
        }
    }
}

/// Where ONNX Runtime runs a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Device {
    #[default]
    Cpu,
    /// An NVIDIA GPU through the CUDA execution provider, by device number.
    Cuda(i32),
}

impl Device {
    /// How much padding a forward pass may carry before a batch is split by length: on a CPU
    /// padding costs as much as text, on a GPU a pass costs about the same however full it is.
    fn padding_allowed(self) -> Option<(usize, usize)> {
        match self {
            Device::Cpu => Some((5, 4)),
            Device::Cuda(_) => None,
        }
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> Result<Device, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .filter(|&n: &i32| n >= 0)
                .map(Device::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`: expected cpu, cuda or cuda:N")),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How ONNX Runtime runs a model.
#[derive(Debug, Clone, Copy, Default)]
pub struct Runtime {
    /// Intra-op threads; 0 lets ONNX Runtime choose (one per core).
    pub threads: usize,
    pub device: Device,
}

/// The ONNX Runtime environment, created once per process.
fn environment() -> Result<&'static ort::environment::Environment, BertError> {
    static ENV: OnceLock<Result<ort::environment::Environment, BertError>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = find_runtime()?;
        let broken = |reason: String| BertError::RuntimeBroken {
            path: path.display().to_string(),
            reason,
        };
        let env = ort::init_from(&path)
            .map_err(|e| broken(e.to_string()))?
            .with_name("sentiflow")
            .build()
            .map_err(|e| broken(e.to_string()))?;
        tracing::debug!("ONNX Runtime from {}", path.display());
        Ok(env)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Where `libonnxruntime.so` is: `ORT_DYLIB_PATH`; the `onnxruntime` wheel in `$VIRTUAL_ENV`, in a
/// `.venv` of the working directory or of a directory above the executable; the system paths.
pub fn find_runtime() -> Result<PathBuf, BertError> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(BertError::RuntimeBroken {
                path: path.display().to_string(),
                reason: "ORT_DYLIB_PATH names no file".into(),
            })
        };
    }
    let mut envs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        envs.push(v.into());
    }
    if let Ok(cwd) = std::env::current_dir() {
        envs.push(cwd.join(".venv"));
    }
    if let Ok(exe) = std::env::current_exe() {
        envs.extend(exe.ancestors().skip(1).map(|d| d.join(".venv")));
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for env in envs {
        for lib in ["lib", "lib64"] {
            for entry in std::fs::read_dir(env.join(lib)).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().starts_with("python") {
                    dirs.push(entry.path().join("site-packages/onnxruntime/capi"));
                }
            }
        }
    }
    if let Some(paths) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths));
    }
    dirs.extend(
        [
            "/usr/local/lib",
            "/usr/lib",
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/opt/onnxruntime/lib",
        ]
        .map(PathBuf::from),
    );
    for dir in &dirs {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
            })
            .collect();
        // `libonnxruntime.so.1.32.0` over the bare link name, the newest first.
        found.sort();
        if let Some(path) = found.pop() {
            return Ok(path);
        }
    }
    Err(BertError::RuntimeMissing {
        searched: "ORT_DYLIB_PATH, the onnxruntime wheel of $VIRTUAL_ENV and of ./.venv, LD_LIBRARY_PATH, \
                   /usr/local/lib, /usr/lib"
            .into(),
    })
}

/// A loaded ONNX classifier and its tokenizer.
pub struct BertModel {
    session: Mutex<Session>,
    tokenizer: Tokenizer,
    /// Text tokens per review: `max_length` less [CLS] and [SEP].
    budget: usize,
    truncation: Truncation,
    unknown_id: Option<u32>,
    cls_id: u32,
    sep_id: u32,
    pad_id: u32,
    device: Device,
}

impl BertModel {
    /// Loads `model.onnx` and `tokenizer.json` from `dir`; reviews are cut to `max_length` tokens
    /// as `truncation` says.
    pub fn load(
        dir: &Path,
        max_length: usize,
        truncation: Truncation,
        runtime: Runtime,
    ) -> Result<BertModel, BertError> {
        let env = environment()?;
        let model_path = dir.join("model.onnx");
        let bad = |path: &Path, reason: String| BertError::Model {
            path: path.display().to_string(),
            reason,
        };
        let mut builder = Session::builder(env)
            .and_then(|b| {
                b.with_optimization_level(GraphOptimizationLevel::Level3)
                    .map_err(Into::into)
            })
            .map_err(|e| bad(&model_path, e.to_string()))?;
        if runtime.threads > 0 {
            builder = builder
                .with_intra_threads(runtime.threads)
                .map_err(|e| bad(&model_path, e.to_string()))?;
        }
        if let Device::Cuda(id) = runtime.device {
            // Without TF32 the GPU's scores match the CPU's (and the bundle's metrics) to ~1e-6.
            let cuda = ort::ep::CUDA::default()
                .with_device_id(id)
                .with_tf32(false)
                .build()
                .error_on_failure();
            builder = builder
                .with_execution_providers([cuda])
                .map_err(|e| BertError::Device {
                    device: runtime.device,
                    reason: e.to_string().trim_end_matches('.').to_string(),
                })?;
        }
        let session = builder
            .commit_from_file(&model_path)
            .map_err(|e| bad(&model_path, e.to_string()))?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        if names != INPUTS {
            return Err(bad(&model_path, format!("inputs are {names:?}, expected {INPUTS:?}")));
        }
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(|e| bad(&tokenizer_path, e.to_string()))?;
        // `predict_batch` truncates and adds [CLS] and [SEP] itself, and `run` pads per group.
        tokenizer
            .with_truncation(None)
            .map_err(|e| bad(&tokenizer_path, e.to_string()))?;
        tokenizer.with_padding(None);
        let special = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| bad(&tokenizer_path, format!("no {token} token")))
        };
        Ok(BertModel {
            session: Mutex::new(session),
            budget: max_length.saturating_sub(2),
            truncation,
            unknown_id: tokenizer.token_to_id("[UNK]"),
            cls_id: special("[CLS]")?,
            sep_id: special("[SEP]")?,
            pad_id: tokenizer.token_to_id("[PAD]").unwrap_or(0),
            tokenizer,
            device: runtime.device,
        })
    }

    /// P(positive) and token counts of each text. On a CPU the texts are sorted by length and
    /// run in groups padded to their own longest text, so that a short review batched with long
    /// ones does not pay for their padding; on a GPU they run in one pass. No pass holds more
    /// than `MAX_PASS` texts.
    pub fn predict_batch(&self, texts: &[&str]) -> Result<Vec<Sample>, BertError> {
        let rows: Vec<Vec<u32>> = self
            .tokenizer
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| BertError::Inference(format!("tokenizer: {e}")))?
            .into_iter()
            .map(|e| {
                let mut ids = e.get_ids().to_vec();
                self.truncation.apply(&mut ids, self.budget);
                ids.insert(0, self.cls_id);
                ids.push(self.sep_id);
                ids
            })
            .collect();
        let mut order: Vec<usize> = (0..texts.len()).collect();
        order.sort_by_key(|&i| rows[i].len());
        let mut scores = vec![0.0; texts.len()];
        let mut rest = order.as_slice();
        while !rest.is_empty() {
            let n = match self.device.padding_allowed() {
                Some(bound) => group_size(rest.iter().map(|&i| rows[i].len()), bound),
                None => rest.len(),
            }
            .min(MAX_PASS);
            let (group, tail) = rest.split_at(n);
            let pass: Vec<&[u32]> = group.iter().map(|&i| rows[i].as_slice()).collect();
            for (&i, score) in group.iter().zip(self.run(&pass)?) {
                scores[i] = score;
            }
            rest = tail;
        }
        Ok(texts
            .iter()
            .zip(&rows)
            .zip(scores)
            .map(|((text, ids), score)| Sample {
                score,
                // Measured on normalised text, as the reference's cleaned validation reviews.
                chars: normalize(text, false).chars().count(),
                // Of the tokens the model sees; [CLS] and [SEP] are not the text's.
                unknown: ids.iter().filter(|&&id| Some(id) == self.unknown_id).count(),
                tokens: ids.len() - 2,
            })
            .collect())
    }

    /// One forward pass over the token ids `rows` (one sequence each: token types 0), padded to
    /// the longest.
    fn run(&self, rows: &[&[u32]]) -> Result<Vec<f64>, BertError> {
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let shape = vec![rows.len() as i64, width as i64];
        let plane = |part: usize| -> Result<Tensor<i64>, BertError> {
            let mut data = Vec::with_capacity(rows.len() * width);
            for row in rows {
                match part {
                    0 => data.extend(row.iter().map(|&id| id as i64)),
                    1 => data.resize(data.len() + row.len(), 1),
                    _ => data.resize(data.len() + row.len(), 0),
                }
                let pad = if part == 0 { self.pad_id as i64 } else { 0 };
                data.resize(data.len() + width - row.len(), pad);
            }
            Tensor::from_array((shape.clone(), data)).map_err(|e| BertError::Inference(e.to_string()))
        };
        let inputs = ort::inputs![
            INPUTS[0] => plane(0)?,
            INPUTS[1] => plane(1)?,
            INPUTS[2] => plane(2)?,
        ];
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session.run(inputs).map_err(|e| BertError::Inference(e.to_string()))?;
        let (_, logits) = outputs["logits"]
            .try_extract_tensor::<f32>()
            .map_err(|e| BertError::Inference(e.to_string()))?;
        Ok(logits
            .chunks_exact(2)
            .map(|l| positive_probability(l[0], l[1]))
            .collect())
    }
}

/// How many of the next texts (lengths in increasing order) to run together: as many as keep
/// the group's padded tokens within `num / den` times its text tokens.
fn group_size(lengths: impl Iterator<Item = usize>, (num, den): (usize, usize)) -> usize {
    let mut n = 0;
    let mut total = 0;
    for len in lengths {
        // Sorted: `len` is the group's new width.
        if n > 0 && (n + 1) * len * den > (total + len) * num {
            break;
        }
        n += 1;
        total += len;
    }
    n.max(1)
}

/// Softmax over two logits, computed in f64 from the model's f32 outputs.
fn positive_probability(negative: f32, positive: f32) -> f64 {
    let (a, b) = (negative as f64, positive as f64);
    1.0 / (1.0 + (a - b).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_bound_padding() {
        let cpu = Device::Cpu.padding_allowed().unwrap();
        assert_eq!(group_size([10, 10, 10, 10].into_iter(), cpu), 4);
        assert_eq!(group_size([10, 11, 12, 40, 41].into_iter(), cpu), 3);
        assert_eq!(group_size([100].into_iter(), cpu), 1);
        assert_eq!(Device::Cuda(0).padding_allowed(), None);
    }

    #[test]
    fn devices_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(Device::Cpu));
        assert_eq!("cuda".parse(), Ok(Device::Cuda(0)));
        assert_eq!(
            "cuda:1".parse::<Device>().map(|d| d.to_string()),
            Ok("cuda:1".to_string())
        );
        for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x"] {
            assert!(bad.parse::<Device>().unwrap_err().contains(bad), "{bad}");
        }
    }

    #[test]
    fn truncation_keeps_head_and_tail_in_order() {
        let cut = |t: Truncation, len: u32, budget: usize| {
            let mut ids: Vec<u32> = (0..len).collect();
            t.apply(&mut ids, budget);
            ids
        };
        for t in [Truncation::Head, Truncation::HeadTail] {
            assert_eq!(cut(t, 6, 6), (0..6).collect::<Vec<_>>(), "short texts are kept whole");
            assert_eq!(cut(t, 0, 6), Vec::<u32>::new());
        }
        assert_eq!(cut(Truncation::Head, 10, 6), [0, 1, 2, 3, 4, 5]);
        assert_eq!(cut(Truncation::HeadTail, 10, 6), [0, 1, 6, 7, 8, 9]);
        // max_length 128: 32 head tokens after [CLS], 94 tail tokens before [SEP].
        let ids = cut(Truncation::HeadTail, 1000, 126);
        assert_eq!(ids.len(), 126);
        assert_eq!(ids[..32], (0..32).collect::<Vec<_>>()[..]);
        assert_eq!(ids[32..], (906..1000).collect::<Vec<_>>()[..]);
        // Sun et al.'s 128 + 382 of 510.
        let ids = cut(Truncation::HeadTail, 600, 510);
        assert_eq!((ids[127], ids[128]), (127, 600 - 382));
    }

    #[test]
    fn softmax_of_two_logits() {
        assert!((positive_probability(0.0, 0.0) - 0.5).abs() < 1e-12);
        assert!(positive_probability(-3.0, 2.0) > 0.99);
        assert!(positive_probability(2.0, -3.0) < 0.01);
    }
}
