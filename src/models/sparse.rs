//! Compressed sparse row matrices, with a small binary file format.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use rayon::prelude::*;

/// Rows of (column, value) pairs: row `i` holds `indices[indptr[i]..indptr[i+1]]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Csr {
    pub cols: usize,
    pub indptr: Vec<u64>,
    pub indices: Vec<u32>,
    pub values: Vec<f32>,
}

const MAGIC: &[u8; 8] = b"SFCSR01\n";

impl Csr {
    pub fn rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }

    pub fn nnz(&self) -> usize {
        self.indices.len()
    }

    pub fn row(&self, i: usize) -> (&[u32], &[f32]) {
        let (a, b) = (self.indptr[i] as usize, self.indptr[i + 1] as usize);
        (&self.indices[a..b], &self.values[a..b])
    }

    /// Builds a matrix from rows of sorted (column, value) pairs.
    pub fn from_rows(cols: usize, rows: Vec<Vec<(u32, f32)>>) -> Csr {
        let mut m = Csr {
            cols,
            indptr: Vec::with_capacity(rows.len() + 1),
            indices: Vec::with_capacity(rows.iter().map(Vec::len).sum()),
            values: Vec::new(),
        };
        m.values.reserve(m.indices.capacity());
        m.indptr.push(0);
        for row in rows {
            for (c, v) in row {
                m.indices.push(c);
                m.values.push(v);
            }
            m.indptr.push(m.indices.len() as u64);
        }
        m
    }

    /// The rows at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> Csr {
        let rows = idx
            .iter()
            .map(|&i| {
                let (c, v) = self.row(i);
                c.iter().copied().zip(v.iter().copied()).collect()
            })
            .collect();
        Csr::from_rows(self.cols, rows)
    }

    /// Multiplies every column `j` by `scale[j]`.
    pub fn scale_columns(&self, scale: &[f32]) -> Csr {
        let mut m = self.clone();
        m.values
            .par_iter_mut()
            .zip(m.indices.par_iter())
            .for_each(|(v, &c)| *v *= scale[c as usize]);
        m
    }

    /// Dot product of row `i` with a dense vector.
    #[inline]
    pub fn dot(&self, i: usize, w: &[f64]) -> f64 {
        let (c, v) = self.row(i);
        c.iter().zip(v).map(|(&j, &x)| w[j as usize] * x as f64).sum()
    }

    /// Squared norm of row `i`.
    pub fn row_sq_norm(&self, i: usize) -> f64 {
        self.row(i).1.iter().map(|&x| (x as f64) * (x as f64)).sum()
    }

    /// The transpose, as CSR (columns become rows). Deterministic: entries keep row order.
    pub fn transpose(&self) -> Csr {
        let mut counts = vec![0u64; self.cols + 1];
        for &c in &self.indices {
            counts[c as usize + 1] += 1;
        }
        for j in 0..self.cols {
            counts[j + 1] += counts[j];
        }
        let mut next = counts.clone();
        let mut indices = vec![0u32; self.nnz()];
        let mut values = vec![0f32; self.nnz()];
        for i in 0..self.rows() {
            let (c, v) = self.row(i);
            for (&j, &x) in c.iter().zip(v) {
                let k = next[j as usize] as usize;
                indices[k] = i as u32;
                values[k] = x;
                next[j as usize] += 1;
            }
        }
        Csr {
            cols: self.rows(),
            indptr: counts,
            indices,
            values,
        }
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut w = BufWriter::new(std::fs::File::create(path)?);
        w.write_all(MAGIC)?;
        for n in [self.rows() as u64, self.cols as u64, self.nnz() as u64] {
            w.write_all(&n.to_le_bytes())?;
        }
        write_slice(&mut w, &self.indptr, |x| x.to_le_bytes())?;
        write_slice(&mut w, &self.indices, |x| x.to_le_bytes())?;
        write_slice(&mut w, &self.values, |x| x.to_le_bytes())?;
        w.flush()
    }

    pub fn load(path: &Path) -> std::io::Result<Csr> {
        let mut r = BufReader::new(std::fs::File::open(path)?);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not a sentiflow sparse matrix",
            ));
        }
        let rows = read_u64(&mut r)? as usize;
        let cols = read_u64(&mut r)? as usize;
        let nnz = read_u64(&mut r)? as usize;
        Ok(Csr {
            cols,
            indptr: read_vec(&mut r, rows + 1, u64::from_le_bytes)?,
            indices: read_vec(&mut r, nnz, u32::from_le_bytes)?,
            values: read_vec(&mut r, nnz, f32::from_le_bytes)?,
        })
    }
}

pub fn write_slice<T: Copy, const N: usize>(
    w: &mut impl Write,
    xs: &[T],
    bytes: impl Fn(T) -> [u8; N],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(xs.len() * N);
    for &x in xs {
        buf.extend_from_slice(&bytes(x));
    }
    w.write_all(&buf)
}

fn read_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub fn read_vec<T, const N: usize>(
    r: &mut impl Read,
    n: usize,
    from: impl Fn([u8; N]) -> T,
) -> std::io::Result<Vec<T>> {
    let mut buf = vec![0u8; n * N];
    r.read_exact(&mut buf)?;
    Ok(buf
        .chunks_exact(N)
        .map(|c| from(c.try_into().expect("chunk of N bytes")))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_transposes() {
        let m = Csr::from_rows(4, vec![vec![(0, 1.0), (3, 2.0)], vec![], vec![(1, 3.0)]]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.csr");
        m.save(&p).unwrap();
        assert_eq!(Csr::load(&p).unwrap(), m);
        let t = m.transpose();
        assert_eq!(t.rows(), 4);
        assert_eq!(t.row(3), (&[0u32][..], &[2.0f32][..]));
        assert_eq!(t.transpose(), m);
    }
}
