//! `uses: load`: reads reviews into a Parquet table with columns `id`, `text`, `label`,
//! `rating`, `source_split` and `movie`.

use std::io::{Read, Write};
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::stage::{Context, Stage, StageError};
use crate::cache::Metrics;
use crate::data::read::{self, Columns, Rejected};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// A `.tar.gz` or directory in the IMDB layout, or a `.csv`, `.jsonl` or `.parquet` file.
    pub path: String,
    /// Overrides the format guessed from the path.
    #[serde(default)]
    pub format: Option<Format>,
    /// Where to download `path` from when it is missing (needs `sha256`).
    #[serde(default)]
    pub url: Option<String>,
    /// Expected SHA-256 of the downloaded file.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Keep only these source splits (`train`, `test`) of an IMDB archive.
    #[serde(default)]
    pub splits: Vec<String>,
    /// Column (CSV, Parquet) or field (JSONL) holding the review text.
    #[serde(default = "default_text")]
    pub text_column: String,
    /// Column or field holding the label (`positive`/`negative`, `pos`/`neg` or `1`/`0`).
    #[serde(default = "default_label")]
    pub label_column: String,
    /// Column or field holding each review's id (default: its row number).
    #[serde(default)]
    pub id_column: Option<String>,
    /// Column or field naming each review's movie (or other group), for splits that keep a
    /// group on one side. The IMDB layout reads it from `urls_pos.txt` and `urls_neg.txt`.
    #[serde(default)]
    pub group_column: Option<String>,
    /// The Parquet table written.
    pub out: String,
}

fn default_text() -> String {
    "review".into()
}
fn default_label() -> String {
    "sentiment".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    Imdb,
    Csv,
    Jsonl,
    Parquet,
}

impl Load {
    fn format(&self, path: &Path) -> Format {
        self.format.unwrap_or_else(|| {
            let name = self.path.to_ascii_lowercase();
            if name.ends_with(".csv") {
                Format::Csv
            } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
                Format::Jsonl
            } else if name.ends_with(".parquet") {
                Format::Parquet
            } else if path.is_dir() || name.ends_with(".tar.gz") || name.ends_with(".tgz") {
                Format::Imdb
            } else {
                Format::Csv
            }
        })
    }
}

impl Stage for Load {
    fn version(&self) -> u32 {
        2
    }

    fn deps(&self) -> Vec<String> {
        vec![self.path.clone()]
    }

    fn outs(&self) -> Vec<String> {
        vec![self.out.clone()]
    }

    fn prepare(&self, root: &Path, log: &(dyn Fn(&str) + Sync)) -> Result<(), StageError> {
        let path = root.join(&self.path);
        if path.exists() {
            return Ok(());
        }
        let hint = format!(
            "put the file at {} or point the pipeline at it (e.g. `--set data=PATH`)",
            path.display()
        );
        let (Some(url), Some(sha)) = (&self.url, &self.sha256) else {
            return Err(StageError::Invalid(format!(
                "{} does not exist: {hint}",
                path.display()
            )));
        };
        log(&format!("{} is missing: downloading {url}", path.display()));
        download(url, sha, &path, log)
            .map_err(|e| StageError::Invalid(format!("downloading {url} failed ({e}): {hint}")))
    }

    fn run(&self, ctx: &Context) -> Result<Metrics, StageError> {
        let path = ctx.path(&self.path);
        let columns = Columns {
            text: &self.text_column,
            label: &self.label_column,
            id: self.id_column.as_deref(),
            group: self.group_column.as_deref(),
        };
        let (mut reviews, rejected) = match self.format(&path) {
            Format::Imdb if path.is_dir() => read::imdb_dir(&path)?,
            Format::Imdb => read::imdb_archive(&path)?,
            Format::Csv => read::csv(&path, &columns)?,
            Format::Jsonl => read::jsonl(&path, &columns)?,
            Format::Parquet => read::parquet(&path, &columns)?,
        };
        if !self.splits.is_empty() {
            let keep: Vec<usize> = (0..reviews.len())
                .filter(|&i| self.splits.contains(&reviews.source_split[i]))
                .collect();
            reviews = reviews.select(&keep);
        }
        report_rejected(ctx, &rejected);
        if reviews.is_empty() {
            return Err(StageError::Invalid(format!(
                "no reviews loaded from {}{}",
                path.display(),
                if rejected.is_empty() {
                    String::new()
                } else {
                    format!(" (rejected: {})", describe(&rejected))
                }
            )));
        }
        reviews.write_parquet(&ctx.path(&self.out))?;
        let mut m = Metrics::new();
        m.insert("rows".into(), reviews.len().into());
        m.insert("positive".into(), reviews.positives().into());
        m.insert("negative".into(), (reviews.len() - reviews.positives()).into());
        let movies = reviews.movies();
        m.insert("movies".into(), movies.into());
        m.insert("without_movie".into(), reviews.without_movie().into());
        for (reason, n) in &rejected {
            m.insert(format!("rejected_{reason}"), (*n).into());
        }
        ctx.info(&format!(
            "loaded {} reviews ({} positive) of {} movies{}",
            reviews.len(),
            reviews.positives(),
            movies,
            match reviews.without_movie() {
                0 => String::new(),
                n => format!("; {n} without a movie"),
            }
        ));
        Ok(m)
    }
}

fn describe(rejected: &Rejected) -> String {
    rejected
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn report_rejected(ctx: &Context, rejected: &Rejected) {
    if !rejected.is_empty() {
        ctx.info(&format!("skipped records: {}", describe(rejected)));
    }
}

/// Downloads `url` to `dest` with a progress line every 10%, verifying its SHA-256 before the
/// file takes its final name.
fn download(url: &str, sha256: &str, dest: &Path, log: &(dyn Fn(&str) + Sync)) -> Result<(), String> {
    // A network that drops packets should fail in seconds, not hang the pipeline.
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .timeout_resolve(Some(std::time::Duration::from_secs(30)))
            .timeout_connect(Some(std::time::Duration::from_secs(30)))
            .build(),
    );
    let response = agent.get(url).call().map_err(|e| e.to_string())?;
    let total: Option<u64> = response
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(|e| e.to_string())?;
    let mut reader = response.into_body().into_reader();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    let mut buf = vec![0u8; 1 << 16];
    let (mut done, mut next_report) = (0u64, 10u64);
    loop {
        let n = reader.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut hasher, &buf[..n]);
        tmp.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        done += n as u64;
        if let Some(total) = total.filter(|t| *t > 0) {
            if done * 100 / total >= next_report {
                log(&format!(
                    "downloaded {next_report}% of {:.1} MiB",
                    total as f64 / 1048576.0
                ));
                next_report += 10;
            }
        }
    }
    let got = hex::encode(sha2::Digest::finalize(hasher));
    if !got.eq_ignore_ascii_case(sha256) {
        return Err(format!("SHA-256 mismatch: expected {sha256}, got {got}"));
    }
    tmp.as_file().sync_all().map_err(|e| e.to_string())?;
    tmp.persist(dest).map_err(|e| e.to_string())?;
    Ok(())
}
