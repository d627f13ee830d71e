//! GGUF reading with every length and offset checked against the file size.
//!
//! candle's own `gguf_file::Content::read` trusts the lengths it reads (a corrupt string
//! length becomes a multi-exabyte allocation), so the header is parsed here over a
//! memory map and only the dequantization is delegated to candle
//! (`ggml_file::qtensor_from_ggml` + `QTensor::dequantize`).
//!
//! Layout facts (GGUF v2/v3): magic `GGUF`, `u32` version, `u64` tensor count, `u64`
//! metadata count, metadata key/values, tensor infos (name, `u32` n_dims, `u64` dims
//! innermost first, `u32` ggml type, `u64` offset), then the data section at the next
//! multiple of `general.alignment` (default 32). Dimensions are stored innermost first;
//! [`TensorInfo::dims`] is reversed to row-major order, so a linear layer reads
//! `[out, in]` like a PyTorch `weight`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{ggml_file, GgmlDType};
use candle_core::{Device, Tensor};
use memmap2::Mmap;

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
const MAX_DIMS: u32 = 4;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and how it is encoded.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Row-major shape (GGUF's innermost-first order reversed).
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
    /// Absolute byte range of the tensor data in the file.
    pub start: usize,
    pub n_bytes: usize,
}

/// An opened, validated GGUF file. The tensor data stays memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, reason: String) -> Error {
        Error::malformed(
            self.path,
            "GGUF",
            format!("{reason} (at byte {})", self.pos),
        )
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated: {what} needs {n} bytes, {} left",
                self.bytes.len() - self.pos
            ))),
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn len(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64(what)?;
        // Each item needs at least `min_item_bytes`, so a length the rest of the file
        // cannot hold is corrupt; checking here keeps allocations bounded by file size.
        let max = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > max {
            return Err(self.err(format!(
                "{what} = {n} exceeds what the rest of the file can hold (truncated or corrupt)"
            )));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what, 1)?;
        let b = self.take(n, what)?;
        // Some writers add trailing NULs; tokens may carry invalid UTF-8 (lossy, as llama.cpp).
        let b = match b.iter().rposition(|&c| c != 0) {
            Some(last) => &b[..=last],
            None => &b[..0],
        };
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    fn value(&mut self, ty: u32, depth: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.take(1, "u8")?[0]),
            1 => Value::I8(self.take(1, "i8")?[0] as i8),
            2 => {
                let b = self.take(2, "u16")?;
                Value::U16(u16::from_le_bytes([b[0], b[1]]))
            }
            3 => {
                let b = self.take(2, "i16")?;
                Value::I16(i16::from_le_bytes([b[0], b[1]]))
            }
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(self.u32("i32")? as i32),
            6 => Value::F32(f32::from_bits(self.u32("f32")?)),
            7 => Value::Bool(self.take(1, "bool")?[0] != 0),
            8 => Value::Str(self.string("string")?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deeply".into()));
                }
                let item_ty = self.u32("array item type")?;
                let min = match item_ty {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    t => return Err(self.err(format!("unknown metadata value type {t}"))),
                };
                let n = self.len("array length", min)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(self.u64("i64")? as i64),
            12 => Value::F64(f64::from_bits(self.u64("f64")?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }
}

/// Map a ggml type id to candle's enum; `None` for ids we do not decode.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

impl GgufFile {
    /// Open and validate a GGUF file: header, metadata, tensor table, and that every
    /// tensor's data lies inside the file.
    ///
    /// The file is memory-mapped; it must not be modified while the returned value lives.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and the documented contract is that the file is
        // not modified while mapped; all reads below are bounds-checked against its length.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut c = Cursor {
            bytes: &mmap,
            pos: 0,
            path,
        };
        let magic = c.take(4, "magic")?;
        if magic != MAGIC {
            return Err(c.err(format!("bad magic {magic:?}, expected \"GGUF\"")));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(c.err(format!("unsupported GGUF version {version} (need 2 or 3)")));
        }
        // A tensor info needs >= 28 bytes, a metadata entry >= 13.
        let n_tensors = c.len("tensor count", 28)?;
        let n_kv = c.len("metadata count", 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata type")?;
            let v = c.value(ty, 0)?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let nd = c.u32("tensor n_dims")?;
            if nd == 0 || nd > MAX_DIMS {
                return Err(c.err(format!("tensor `{name}` has {nd} dims (1..={MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(c.u64("tensor dim")?);
            }
            dims.reverse();
            let ty = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            raw.push((name, dims, ty, offset));
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(c.err(format!(
                "general.alignment {alignment} is not a power of two"
            )));
        }
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = mmap.len() as u64;
        let mut tensors = BTreeMap::new();
        for (name, dims, ty, offset) in raw {
            let dtype = ggml_dtype(ty).ok_or_else(|| Error::UnsupportedDType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: format!("ggml type id {ty}"),
            })?;
            let n_elems = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n > 0)
                .ok_or_else(|| c.err(format!("tensor `{name}` has invalid dims {dims:?}")))?;
            let block = dtype.block_size() as u64;
            if n_elems % block != 0 || dims.last().copied().unwrap_or(0) % block != 0 {
                return Err(c.err(format!(
                    "tensor `{name}`: {n_elems} elements with rows of {} do not fill blocks of {block}",
                    dims.last().copied().unwrap_or(0)
                )));
            }
            let n_bytes = n_elems / block * dtype.type_size() as u64;
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(n_bytes));
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => {
                    tensors.insert(
                        name,
                        TensorInfo {
                            dims: dims.iter().map(|&d| d as usize).collect(),
                            dtype,
                            start: s as usize,
                            n_bytes: n_bytes as usize,
                        },
                    );
                }
                _ => {
                    return Err(Error::malformed(
                        path,
                        "GGUF",
                        format!(
                            "tensor `{name}` data [{}+{offset}, +{n_bytes}) lies beyond the end of the file ({file_len} bytes): truncated?",
                            data_start
                        ),
                    ))
                }
            }
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// Dequantize one tensor to an f32 CPU tensor of its row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            tensor: name.to_string(),
        })?;
        let bytes = &self.mmap[info.start..info.start + info.n_bytes];
        let q = ggml_file::qtensor_from_ggml(info.dtype, bytes, info.dims.clone(), &Device::Cpu)
            .map_err(|e| Error::malformed(&self.path, "GGUF", format!("tensor `{name}`: {e}")))?;
        let t = q
            .dequantize(&Device::Cpu)
            .map_err(|e| Error::malformed(&self.path, "GGUF", format!("tensor `{name}`: {e}")))?;
        Ok(t.to_dtype(candle_core::DType::F32)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Write a minimal GGUF v3 file: metadata of (key, type, payload) and f32 tensors.
    pub(crate) fn write_gguf(
        meta: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, Vec<usize>, Vec<f32>)],
    ) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        for (k, ty, payload) in meta {
            s(&mut b, k);
            b.extend_from_slice(&ty.to_le_bytes());
            b.extend_from_slice(payload);
        }
        let mut offset = 0u64;
        for (name, dims, data) in tensors {
            s(&mut b, name);
            b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims.iter().rev() {
                b.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
            offset += (data.len() * 4).div_ceil(32) as u64 * 32;
        }
        while b.len() % 32 != 0 {
            b.push(0);
        }
        for (_, _, data) in tensors {
            let start = b.len();
            for v in data {
                b.extend_from_slice(&v.to_le_bytes());
            }
            while (b.len() - start) % 32 != 0 {
                b.push(0);
            }
        }
        b
    }

    fn tmp(bytes: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    #[test]
    fn reads_metadata_and_f32_tensor() {
        let bytes = write_gguf(
            &[("general.architecture", 8, {
                let mut p = (5u64).to_le_bytes().to_vec();
                p.extend_from_slice(b"llama");
                p
            })],
            &[("w", vec![2, 3], vec![1., 2., 3., 4., 5., 6.])],
        );
        let f = tmp(&bytes);
        let g = GgufFile::open(f.path()).unwrap();
        assert_eq!(
            g.get("general.architecture").unwrap().as_str(),
            Some("llama")
        );
        let t = g.tensor_f32("w").unwrap();
        assert_eq!(t.dims(), &[2, 3]);
        assert_eq!(t.to_vec2::<f32>().unwrap()[1], vec![4., 5., 6.]);
        let err = g.tensor_f32("nope").unwrap_err().to_string();
        assert!(err.contains("missing tensor `nope`"), "{err}");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let bytes = write_gguf(
            &[("a.b", 4, 7u32.to_le_bytes().to_vec())],
            &[("t", vec![4, 8], vec![0.5; 32])],
        );
        for cut in 0..bytes.len() {
            let f = tmp(&bytes[..cut]);
            match GgufFile::open(f.path()) {
                Err(e) => {
                    let msg = e.to_string();
                    assert!(msg.contains("GGUF") || msg.contains("truncated"), "{msg}");
                }
                // Cutting only alignment padding after the last tensor keeps a valid file.
                Ok(g) => assert!(g.tensor_f32("t").is_ok(), "cut {cut} opened but unreadable"),
            }
        }
    }

    #[test]
    fn corrupt_lengths_and_types_are_errors() {
        let good = write_gguf(&[], &[("t", vec![2, 32], vec![1.0; 64])]);
        // tensor type id (after name: 8+1 bytes, n_dims 4, dims 16) -> unknown 99
        let mut bad_type = good.clone();
        let ty_at = 24 + 8 + 1 + 4 + 16;
        bad_type[ty_at..ty_at + 4].copy_from_slice(&99u32.to_le_bytes());
        let f = tmp(&bad_type);
        let err = GgufFile::open(f.path()).unwrap_err().to_string();
        assert!(err.contains("tensor `t` has unsupported type"), "{err}");

        let mut huge = good.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let f = tmp(&huge);
        let err = GgufFile::open(f.path()).unwrap_err().to_string();
        assert!(err.contains("exceeds"), "{err}");

        let mut bad_magic = good;
        bad_magic[0] = b'X';
        let f = tmp(&bad_magic);
        assert!(GgufFile::open(f.path())
            .unwrap_err()
            .to_string()
            .contains("bad magic"));
    }
}
