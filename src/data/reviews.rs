//! The rows every stage passes on, column by column, and their Parquet form.

use std::fs::File;
use std::path::Path;

use polars::prelude::*;

/// Labelled reviews, column by column. `label` is 1 for positive, 0 for negative; `movie` is
/// what the review is about (IMDB's `tt…` title id), the group that splits keep on one side.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Reviews {
    pub id: Vec<String>,
    pub text: Vec<String>,
    pub label: Vec<u8>,
    pub rating: Vec<Option<i32>>,
    pub source_split: Vec<String>,
    pub movie: Vec<Option<String>>,
}

/// The columns of a reviews table on disk: name, MLflow type, and whether every row has a value.
pub const COLUMNS: [(&str, &str, bool); 6] = [
    ("id", "string", true),
    ("text", "string", true),
    ("label", "integer", true),
    ("rating", "integer", false),
    ("source_split", "string", true),
    ("movie", "string", false),
];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    #[error("{path}: {source}")]
    Parquet {
        path: String,
        #[source]
        source: PolarsError,
    },
}

impl DataError {
    pub fn format(path: &Path, message: impl Into<String>) -> Self {
        DataError::Format {
            path: path.display().to_string(),
            message: message.into(),
        }
    }
}

impl Reviews {
    pub fn len(&self) -> usize {
        self.id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.id.is_empty()
    }

    pub fn push(
        &mut self,
        id: String,
        text: String,
        label: u8,
        rating: Option<i32>,
        split: &str,
        movie: Option<String>,
    ) {
        self.id.push(id);
        self.text.push(text);
        self.label.push(label);
        self.rating.push(rating);
        self.source_split.push(split.to_string());
        self.movie.push(movie);
    }

    /// The rows at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> Reviews {
        Reviews {
            id: indices.iter().map(|&i| self.id[i].clone()).collect(),
            text: indices.iter().map(|&i| self.text[i].clone()).collect(),
            label: indices.iter().map(|&i| self.label[i]).collect(),
            rating: indices.iter().map(|&i| self.rating[i]).collect(),
            source_split: indices.iter().map(|&i| self.source_split[i].clone()).collect(),
            movie: indices.iter().map(|&i| self.movie[i].clone()).collect(),
        }
    }

    /// Rows without a movie, for the error when a grouped split or fold cannot be made.
    pub fn without_movie(&self) -> usize {
        self.movie.iter().filter(|m| m.is_none()).count()
    }

    /// Distinct movies among the rows.
    pub fn movies(&self) -> usize {
        self.movie
            .iter()
            .flatten()
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    pub fn positives(&self) -> usize {
        self.label.iter().filter(|&&l| l == 1).count()
    }

    /// Writes the table with the columns [`COLUMNS`] names.
    pub fn write_parquet(&self, path: &Path) -> Result<(), DataError> {
        let err = |source| DataError::Parquet {
            path: path.display().to_string(),
            source,
        };
        let mut df = df!(
            "id" => &self.id,
            "text" => &self.text,
            "label" => &self.label.iter().map(|&l| l as i32).collect::<Vec<_>>(),
            "rating" => &self.rating,
            "source_split" => &self.source_split,
            "movie" => &self.movie,
        )
        .map_err(err)?;
        let file = File::create(path).map_err(|e| DataError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        ParquetWriter::new(file)
            .with_compression(ParquetCompression::Zstd(None))
            .finish(&mut df)
            .map_err(err)?;
        Ok(())
    }
}
