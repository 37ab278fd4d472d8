//! Readers for the formats reviews come in: the IMDB layout (directory or `.tar.gz`, streamed),
//! CSV, JSONL and Parquet. Records that cannot be used are counted per reason, never dropped
//! silently.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use polars::prelude::*;

use super::reviews::{DataError, Reviews};

/// Why records were not loaded, with counts.
pub type Rejected = BTreeMap<&'static str, usize>;

/// The columns (CSV, Parquet) or fields (JSONL) a table's reviews are read from.
pub struct Columns<'a> {
    pub text: &'a str,
    pub label: &'a str,
    pub id: Option<&'a str>,
    /// The movie (or other group) of each review.
    pub group: Option<&'a str>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Opens a data file, refusing FIFOs, devices and sockets: opening a FIFO blocks until a writer
/// comes and a device such as `/dev/zero` never ends, so the stage would hang. The type is checked
/// before opening and again on the open file, opened with `O_NONBLOCK` in case the path changed
/// in between (the flag changes nothing for regular files). Directories pass, to fail on reading.
fn open(path: &Path) -> Result<File, DataError> {
    let refuse = |meta: std::fs::Metadata| {
        match crate::cache::special_kind(meta.file_type()) {
            Some(kind) => Err(DataError::format(
                path,
                format!(
                    "is a {kind}, not a regular file: reading it could block or never end; point the stage at a regular file or a directory of them"
                ),
            )),
            None => Ok(()),
        }
    };
    refuse(std::fs::metadata(path).map_err(io(path))?)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io(path))?;
    refuse(file.metadata().map_err(io(path))?)?;
    Ok(file)
}

/// `positive`/`negative`, `pos`/`neg`, `1`/`0` (any case) to 1/0.
pub fn parse_label(raw: &str) -> Option<u8> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "positive" | "pos" | "1" | "true" => Some(1),
        "negative" | "neg" | "0" | "false" => Some(0),
        _ => None,
    }
}

/// One file of the IMDB layout: `aclImdb/{train,test}/{pos,neg}/ID_RATING.txt`.
struct ImdbPath {
    split: String,
    label: u8,
    id: u32,
    rating: Option<i32>,
}

fn imdb_path(path: &str) -> Option<ImdbPath> {
    let parts: Vec<&str> = path.trim_start_matches("./").split('/').collect();
    let n = parts.len();
    if n < 3 {
        return None;
    }
    let (split, class, file) = (parts[n - 3], parts[n - 2], parts[n - 1]);
    if split != "train" && split != "test" {
        return None;
    }
    let label = match class {
        "pos" => 1,
        "neg" => 0,
        _ => return None, // `unsup` and anything else carries no label
    };
    let stem = file.strip_suffix(".txt")?;
    let (id, rating) = stem.split_once('_')?;
    Some(ImdbPath {
        split: split.to_string(),
        label,
        id: id.parse().ok()?,
        rating: rating.parse().ok(),
    })
}

/// `train/urls_pos.txt` and the like: line N names the movie of review N of that split and class.
fn imdb_urls(path: &str) -> Option<(String, u8)> {
    let parts: Vec<&str> = path.trim_start_matches("./").split('/').collect();
    let [.., split, file] = parts.as_slice() else {
        return None;
    };
    let label = match *file {
        "urls_pos.txt" => 1,
        "urls_neg.txt" => 0,
        _ => return None,
    };
    (*split == "train" || *split == "test").then(|| (split.to_string(), label))
}

/// The `tt…` title id of an IMDB url (`http://www.imdb.com/title/tt0453418/usercomments`), or
/// the trimmed line itself for any other form; `None` for an empty line.
fn movie_of(line: &str) -> Option<String> {
    let line = line.trim();
    let title = line
        .split('/')
        .find(|p| p.len() > 2 && p.starts_with("tt") && p[2..].bytes().all(|b| b.is_ascii_digit()));
    match title {
        Some(t) => Some(t.to_string()),
        None if line.is_empty() => None,
        None => Some(line.to_string()),
    }
}

#[derive(Default)]
struct ImdbCollector {
    rows: Vec<(ImdbPath, String)>,
    /// (split, label) → the movie of each review id.
    urls: BTreeMap<(String, u8), Vec<Option<String>>>,
    rejected: Rejected,
}

impl ImdbCollector {
    fn add(&mut self, path: &str, bytes: Result<Vec<u8>, std::io::Error>) {
        if let Some(key) = imdb_urls(path) {
            if let Ok(text) = bytes.map(|b| String::from_utf8_lossy(&b).into_owned()) {
                self.urls.insert(key, text.lines().map(movie_of).collect());
            }
            return;
        }
        let Some(meta) = imdb_path(path) else {
            // Only review files are counted; the README, vocabularies and `unsup/` are not records.
            if path.ends_with(".txt") && path.contains("/pos/") | path.contains("/neg/") {
                *self.rejected.entry("bad_file_name").or_default() += 1;
            }
            return;
        };
        match bytes {
            Err(_) => *self.rejected.entry("unreadable").or_default() += 1,
            Ok(b) => match String::from_utf8(b) {
                Err(_) => *self.rejected.entry("non_utf8").or_default() += 1,
                Ok(t) if t.trim().is_empty() => *self.rejected.entry("empty").or_default() += 1,
                Ok(t) => self.rows.push((meta, t)),
            },
        }
    }

    /// Rows in a fixed order (split, label, id) whatever order the archive had.
    fn finish(mut self) -> (Reviews, Rejected) {
        self.rows
            .sort_by(|a, b| (&a.0.split, b.0.label, a.0.id).cmp(&(&b.0.split, a.0.label, b.0.id)));
        let mut r = Reviews::default();
        for (m, text) in self.rows {
            let id = format!("{}_{}_{}", m.split, if m.label == 1 { "pos" } else { "neg" }, m.id);
            let movie = self.urls.get(&(m.split.clone(), m.label));
            let movie = movie.and_then(|u| u.get(m.id as usize)).cloned().flatten();
            r.push(id, text, m.label, m.rating, &m.split, movie);
        }
        (r, self.rejected)
    }
}

/// Reads the IMDB layout from a `.tar.gz`, streaming it without extracting.
pub fn imdb_archive(path: &Path) -> Result<(Reviews, Rejected), DataError> {
    let file = open(path)?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::with_capacity(1 << 20, file)));
    let mut c = ImdbCollector::default();
    let entries = archive
        .entries()
        .map_err(|e| DataError::format(path, format!("not a .tar.gz archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| DataError::format(path, format!("corrupt archive: {e}")))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry
            .path()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if imdb_path(&name).is_none() && imdb_urls(&name).is_none() && !name.ends_with(".txt") {
            continue;
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        let read = entry.read_to_end(&mut bytes).map(|_| bytes);
        c.add(&name, read);
    }
    Ok(c.finish())
}

/// Reads the IMDB layout from an extracted directory (the one holding `train/` or `aclImdb/`).
pub fn imdb_dir(path: &Path) -> Result<(Reviews, Rejected), DataError> {
    let mut c = ImdbCollector::default();
    let base = if path.join("aclImdb").is_dir() {
        path.join("aclImdb")
    } else {
        path.to_path_buf()
    };
    for split in ["train", "test"] {
        for class in ["pos", "neg"] {
            let urls = base.join(split).join(format!("urls_{class}.txt"));
            if urls.is_file() {
                c.add(&format!("{split}/urls_{class}.txt"), std::fs::read(&urls));
            }
            let dir = base.join(split).join(class);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let entry = entry.map_err(io(&dir))?;
                let name = format!("{split}/{class}/{}", entry.file_name().to_string_lossy());
                // A file that cannot be read is counted; one that could hang the stage is refused.
                let read = match open(&entry.path()) {
                    Ok(mut file) => {
                        let mut bytes = Vec::new();
                        file.read_to_end(&mut bytes).map(|_| bytes)
                    }
                    Err(DataError::Io { source, .. }) => Err(source),
                    Err(refused) => return Err(refused),
                };
                c.add(&name, read);
            }
        }
    }
    let (r, rejected) = c.finish();
    if r.is_empty() && rejected.is_empty() {
        return Err(DataError::format(
            path,
            "no `train/{pos,neg}` or `test/{pos,neg}` review files found",
        ));
    }
    Ok((r, rejected))
}

struct RowCollector {
    reviews: Reviews,
    rejected: Rejected,
    split: String,
}

impl RowCollector {
    fn new(path: &Path) -> Self {
        RowCollector {
            reviews: Reviews::default(),
            rejected: Rejected::new(),
            split: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    fn add(&mut self, id: Option<String>, text: Option<String>, label: Option<String>, group: Option<String>) {
        let n = self.reviews.len() + self.rejected.values().sum::<usize>();
        let Some(text) = text.filter(|t| !t.trim().is_empty()) else {
            *self.rejected.entry("empty").or_default() += 1;
            return;
        };
        let Some(label) = label.as_deref().and_then(parse_label) else {
            *self.rejected.entry("no_label").or_default() += 1;
            return;
        };
        let id = id.unwrap_or_else(|| format!("row{n}"));
        let split = self.split.clone();
        let movie = group.filter(|g| !g.trim().is_empty());
        self.reviews.push(id, text, label, None, &split, movie);
    }
}

/// Reads a CSV file with a header, taking the named columns.
pub fn csv(path: &Path, columns: &Columns) -> Result<(Reviews, Rejected), DataError> {
    let mut reader = ::csv::ReaderBuilder::new().flexible(true).from_reader(open(path)?);
    let headers = reader
        .headers()
        .map_err(|e| DataError::format(path, e.to_string()))?
        .clone();
    let find = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            // The header is the file's first line: it is only quoted when it looks like column
            // names, so pointing `load` at some other file never prints what that file holds.
            let names: Vec<&str> = headers.iter().collect();
            let plausible = names
                .iter()
                .all(|h| h.len() <= 64 && h.chars().all(|c| c.is_alphanumeric() || " _-.".contains(c)));
            let found = if plausible {
                format!("columns are: {}", names.join(", "))
            } else {
                format!(
                    "its first line ({} fields) does not look like a CSV header",
                    names.len()
                )
            };
            DataError::format(
                path,
                format!("no column `{name}`; {found}; name the columns with `text_column` and `label_column`"),
            )
        })
    };
    let (t, l) = (find(columns.text)?, find(columns.label)?);
    let i = columns.id.map(find).transpose()?;
    let g = columns.group.map(find).transpose()?;
    let mut c = RowCollector::new(path);
    for record in reader.byte_records() {
        let Ok(record) = record else {
            *c.rejected.entry("unreadable").or_default() += 1;
            continue;
        };
        let field = |k: usize| record.get(k).map(|b| std::str::from_utf8(b).map(str::to_string));
        match (field(t), field(l)) {
            (Some(Err(_)), _) | (_, Some(Err(_))) => *c.rejected.entry("non_utf8").or_default() += 1,
            (text, label) => {
                let id = i.and_then(field).and_then(Result::ok);
                let group = g.and_then(field).and_then(Result::ok);
                c.add(id, text.and_then(Result::ok), label.and_then(Result::ok), group);
            }
        }
    }
    Ok((c.reviews, c.rejected))
}

/// Reads JSON Lines, one object per line, taking the named fields.
pub fn jsonl(path: &Path, columns: &Columns) -> Result<(Reviews, Rejected), DataError> {
    let file = open(path)?;
    let mut c = RowCollector::new(path);
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(io(path))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            *c.rejected.entry("non_utf8").or_default() += 1;
            continue;
        };
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_str(text) else {
            *c.rejected.entry("unreadable").or_default() += 1;
            continue;
        };
        let get = |k: &str| {
            obj.get(k).and_then(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                serde_json::Value::Bool(b) => Some(b.to_string()),
                _ => None,
            })
        };
        c.add(
            columns.id.and_then(get),
            get(columns.text),
            get(columns.label),
            columns.group.and_then(get),
        );
    }
    Ok((c.reviews, c.rejected))
}

/// Reads a Parquet file, taking the named columns (label as text or integer).
pub fn parquet(path: &Path, columns: &Columns) -> Result<(Reviews, Rejected), DataError> {
    let perr = |source| DataError::Parquet {
        path: path.display().to_string(),
        source,
    };
    let file = open(path)?;
    let df = ParquetReader::new(file).finish().map_err(perr)?;
    let names: Vec<String> = df.get_column_names().iter().map(|s| s.to_string()).collect();
    let col = |name: &str| {
        df.column(name)
            .map_err(|_| DataError::format(path, format!("no column `{name}`; columns are: {}", names.join(", "))))
    };
    let as_strings = |c: &Column| -> Result<Vec<Option<String>>, DataError> {
        let s = c.cast(&DataType::String).map_err(perr)?;
        Ok(s.str().map_err(perr)?.iter().map(|v| v.map(str::to_string)).collect())
    };
    let texts = as_strings(col(columns.text)?)?;
    let labels = as_strings(col(columns.label)?)?;
    let ids = columns
        .id
        .filter(|c| names.iter().any(|n| n == c))
        .map(|c| as_strings(col(c)?))
        .transpose()?;
    let groups = columns.group.map(|c| as_strings(col(c)?)).transpose()?;
    let ratings: Option<Vec<Option<i32>>> = names
        .iter()
        .any(|n| n == "rating")
        .then(|| df.column("rating").and_then(|c| c.cast(&DataType::Int32)).ok())
        .flatten()
        .and_then(|c| c.i32().ok().map(|ca| ca.iter().collect()));
    let splits: Option<Vec<Option<String>>> = names
        .iter()
        .any(|n| n == "source_split")
        .then(|| as_strings(col("source_split")?))
        .transpose()?;

    let mut c = RowCollector::new(path);
    for k in 0..texts.len() {
        let before = c.reviews.len();
        c.add(
            ids.as_ref().and_then(|v| v[k].clone()),
            texts[k].clone(),
            labels[k].clone(),
            groups.as_ref().and_then(|v| v[k].clone()),
        );
        if c.reviews.len() > before {
            if let Some(r) = &ratings {
                *c.reviews.rating.last_mut().expect("just pushed") = r[k];
            }
            if let Some(Some(s)) = splits.as_ref().map(|v| v[k].clone()) {
                *c.reviews.source_split.last_mut().expect("just pushed") = s;
            }
        }
    }
    Ok((c.reviews, c.rejected))
}

impl Reviews {
    /// Reads a table written by [`Reviews::write_parquet`].
    pub fn read_parquet(path: &Path) -> Result<Reviews, DataError> {
        let columns = Columns {
            text: "text",
            label: "label",
            id: Some("id"),
            group: Some("movie"),
        };
        parquet(path, &columns).map(|(r, _)| r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn fifos_and_devices_are_refused_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("reviews.jsonl");
        mkfifo(&fifo);
        let pos = dir.path().join("train/pos");
        std::fs::create_dir_all(&pos).unwrap();
        std::fs::write(pos.join("0_9.txt"), "fine").unwrap();
        mkfifo(&pos.join("1_10.txt"));
        let columns = Columns {
            text: "review",
            label: "sentiment",
            id: None,
            group: None,
        };
        let errors = [
            (jsonl(&fifo, &columns).unwrap_err(), "FIFO"),
            (csv(Path::new("/dev/zero"), &columns).unwrap_err(), "character device"),
            (imdb_dir(dir.path()).unwrap_err(), "FIFO"),
        ];
        for (error, kind) in errors {
            assert!(
                error.to_string().contains(&format!("is a {kind}, not a regular file")),
                "{error}"
            );
        }
    }
}
