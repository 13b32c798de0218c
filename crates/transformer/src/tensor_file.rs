//! One `.safetensors` file as a list of named f32 tensors: read through a memory map, written
//! atomically.
//!
//! The format (<https://github.com/huggingface/safetensors>) is an 8-byte little-endian header
//! length, a JSON header `{"name": {"dtype": "F32", "shape": [..], "data_offsets": [a, b]}, ..}`,
//! then the raw little-endian bytes of every tensor. Parsing and serialising are the
//! `safetensors` crate's; this file adds dtype conversion (f32, f16 and bf16 on disk, always f32
//! in memory), error messages that name the file, and crash-safe writes.
//!
//! This is generic I/O: no GPT-2 names here. [`crate::checkpoint`] checks a model file against
//! the size table, and the LoRA crate can use the same two functions for adapter files.
//!
//! **Hostile files.** Every loader of the workspace reads tensors through [`read_tensors`], so
//! this is where a damaged or malicious file is stopped. Reading never panics and never
//! allocates more than the file's own size: the header length is checked against the file's
//! length before anything is parsed, the `safetensors` crate then checks that the header is
//! UTF-8 JSON, that every tensor's `data_offsets` are in range, contiguous and not overlapping,
//! and that each shape's product (with overflow checks) times its dtype's size is exactly its
//! byte range; only then are values copied out. Every error starts with the file's path.
//!
//! **Non-finite values are errors.** A NaN or ±inf among the values of a tensor we read makes
//! [`read_tensors`] fail with the tensor's name, how many values are not finite and where the
//! first one is. No weight, adapter or optimizer moment of a usable model is NaN or infinite
//! (the trainer stops before a step would write one), so such a value means a damaged file,
//! and loading it would only turn every later output into NaN far from the cause. Tensors a
//! loader skips (`read_tensors_where`'s filter) are not decoded and not checked.
//!
//! Text files beside the tensors (`config.json`, `adapter_config.json`, `vocab.json`, ...) are
//! read with [`read_text`], which refuses files larger than a stated bound instead of
//! allocating whatever a (possibly endless) file holds.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, View};
use tensor::quant::Nf4Weight;

use crate::error::{Error, Result};
use crate::nf4_file;

/// A tensor read from or written to a file: name, shape (row-major, outermost first), values.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// How tensors are stored on disk. In memory they are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDtype {
    /// 4 bytes a value, exact.
    F32,
    /// IEEE half: 2 bytes, 11-bit significand, largest finite value 65504.
    F16,
    /// bfloat16: 2 bytes, f32's exponent range, 8-bit significand.
    BF16,
}

/// Reads every tensor of a safetensors file, converting f32, f16 and bf16 to f32, sorted by
/// name. Any other dtype (integers, f64, fp8) is an error naming the tensor, and so is a NaN or
/// infinite value (see the module docs).
pub fn read_tensors(path: &Path) -> Result<Vec<NamedTensor>> {
    read_tensors_where(path, |_| true)
}

/// As [`read_tensors`], for the tensors whose name satisfies `keep`; the others are not
/// converted, and may have any dtype.
pub fn read_tensors_where(path: &Path, keep: impl Fn(&str) -> bool) -> Result<Vec<NamedTensor>> {
    read_tensors_with(path, keep, |_| false)
}

/// As [`read_tensors_where`], where the tensors named by `nonfinite_ok` may hold NaN or
/// infinite values (a record that uses NaN as a marker, such as the per-step losses of a
/// training state, where a skipped step is NaN).
pub fn read_tensors_with(
    path: &Path,
    keep: impl Fn(&str) -> bool,
    nonfinite_ok: impl Fn(&str) -> bool,
) -> Result<Vec<NamedTensor>> {
    with_file(path, |file| decode_all(path, file, keep, nonfinite_ok))
}

/// A model file that may hold bitsandbytes' 4-bit weights ([`crate::nf4_file`]): its NF4
/// weights by name, and, as [`read_tensors_where`], every other tensor whose name passes `keep`
/// (the parts of the quantized weights are not among them).
pub fn read_tensors_and_nf4(
    path: &Path,
    keep: impl Fn(&str) -> bool,
) -> Result<(Vec<NamedTensor>, BTreeMap<String, Nf4Weight>)> {
    with_file(path, |file| {
        let nf4 = nf4_file::read_nf4_weights(file).map_err(|m| Error::checkpoint(path, m))?;
        let plain = |name: &str| !nf4.contains_key(name) && !nf4_file::is_quant_part(name);
        let tensors = decode_all(path, file, |name| plain(name) && keep(name), |_| false)?;
        Ok((tensors, nf4))
    })
}

/// Maps `path` and hands its parsed safetensors to `read`.
fn with_file<T>(path: &Path, read: impl FnOnce(&SafeTensors<'_>) -> Result<T>) -> Result<T> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and lives only inside this function, while we copy each
    // tensor out. Another process truncating or rewriting the file during those milliseconds
    // could change the bytes under us (or fault on a truncation); our own writers never do
    // that, because they replace files by rename (see `write_tensors`).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    check_header_length(&map).map_err(|m| Error::checkpoint(path, m))?;
    let file = SafeTensors::deserialize(&map)
        .map_err(|e| Error::checkpoint(path, format!("not a readable safetensors file: {e}")))?;
    read(&file)
}

/// Every tensor of `file` whose name passes `keep`, converted to f32 and sorted by name.
fn decode_all(
    path: &Path,
    file: &SafeTensors<'_>,
    keep: impl Fn(&str) -> bool,
    nonfinite_ok: impl Fn(&str) -> bool,
) -> Result<Vec<NamedTensor>> {
    let mut tensors = Vec::with_capacity(file.len());
    for (name, view) in file.iter().filter(|(name, _)| keep(name)) {
        let data = decode(view.dtype(), view.data()).ok_or_else(|| {
            Error::checkpoint(
                path,
                format!(
                    "tensor `{name}`: expected dtype F32, F16 or BF16, found {:?}",
                    view.dtype()
                ),
            )
        })?;
        if !nonfinite_ok(name) {
            check_finite(name, &data).map_err(|m| Error::checkpoint(path, m))?;
        }
        tensors.push((name.to_string(), view.shape().to_vec(), data));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// The largest header the `safetensors` crate parses (100 MB); GPT-2 XL's is under 100 kB.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// The first 8 bytes, little-endian, are the header's length: it must fit in the file (after
/// those 8 bytes) and under [`MAX_HEADER_BYTES`]. Checked here, before any parsing, so that the
/// message says what the length is and what the file holds.
fn check_header_length(bytes: &[u8]) -> std::result::Result<(), String> {
    let file_len = bytes.len() as u64;
    let Some(prefix) = bytes.get(..8) else {
        return Err(format!(
            "not a safetensors file: {file_len} bytes, too short for the 8-byte header length"
        ));
    };
    let mut len = [0u8; 8];
    len.copy_from_slice(prefix);
    let header = u64::from_le_bytes(len);
    if header > file_len - 8 {
        return Err(format!(
            "not a readable safetensors file: the header length says {header} bytes, but only \
             {} follow it (the file is {file_len} bytes; truncated or not safetensors)",
            file_len - 8
        ));
    }
    if header > MAX_HEADER_BYTES {
        return Err(format!(
            "not a readable safetensors file: a header of {header} bytes, more than the \
             {MAX_HEADER_BYTES} this reader accepts"
        ));
    }
    Ok(())
}

/// `Err` naming the tensor, the count of NaN/±inf values and the first one's index.
pub fn check_finite(name: &str, data: &[f32]) -> std::result::Result<(), String> {
    let Some(first) = data.iter().position(|x| !x.is_finite()) else {
        return Ok(());
    };
    let count = data[first..].iter().filter(|x| !x.is_finite()).count();
    Err(format!(
        "tensor `{name}`: {count} of its {} values are not finite (NaN or infinite; the first, \
         at index {first}, is {}); a damaged file or a diverged run",
        data.len(),
        data[first]
    ))
}

/// Reads the text file `path`, refusing one larger than `max_bytes` (or not UTF-8) with an error
/// naming the file (an [`Error::Io`] of kind `InvalidData`); at most `max_bytes + 1` bytes are ever read, so a huge or endless file (a
/// device, a pipe) cannot exhaust memory.
pub fn read_text(path: &Path, max_bytes: u64) -> Result<String> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let invalid = |m: String| Error::io(path, std::io::Error::new(ErrorKind::InvalidData, m));
    if bytes.len() as u64 > max_bytes {
        return Err(invalid(format!(
            "larger than {max_bytes} bytes, the most this reader accepts for this file"
        )));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        invalid(format!("not UTF-8 text (invalid byte at offset {at})"))
    })
}

/// Little-endian bytes of `dtype` to f32; `None` for dtypes we do not read.
fn decode(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    // `chunks_exact` + `from_le_bytes` reads unaligned data portably: a tensor's offset in the
    // file need not be a multiple of 4, and the file is little-endian whatever the host is.
    Some(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    })
}

/// A tensor as `safetensors` wants to serialise it; the bytes are produced only when the
/// serialiser asks for them, so saving needs one tensor's worth of extra memory, not a model's.
struct Encoded<'a> {
    dtype: SaveDtype,
    shape: &'a [usize],
    data: &'a [f32],
}

/// A tensor to write: f32 values encoded on the way out, or bytes stored as they are.
enum Stored<'a> {
    Encoded(Encoded<'a>),
    Raw {
        dtype: Dtype,
        shape: Vec<usize>,
        bytes: Vec<u8>,
    },
}

impl View for Stored<'_> {
    fn dtype(&self) -> Dtype {
        match self {
            Stored::Encoded(e) => e.dtype(),
            Stored::Raw { dtype, .. } => *dtype,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Stored::Encoded(e) => e.shape(),
            Stored::Raw { shape, .. } => shape,
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Stored::Encoded(e) => e.data(),
            Stored::Raw { bytes, .. } => Cow::Borrowed(bytes),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Stored::Encoded(e) => e.data_len(),
            Stored::Raw { bytes, .. } => bytes.len(),
        }
    }
}

impl View for Encoded<'_> {
    fn dtype(&self) -> Dtype {
        match self.dtype {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::F16 => Dtype::F16,
            SaveDtype::BF16 => Dtype::BF16,
        }
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let data = self.data.iter();
        Cow::Owned(match self.dtype {
            SaveDtype::F32 => data.flat_map(|x| x.to_le_bytes()).collect(),
            SaveDtype::F16 => data.flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
            SaveDtype::BF16 => data
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
        })
    }

    fn data_len(&self) -> usize {
        let bytes_per_value = if self.dtype == SaveDtype::F32 { 4 } else { 2 };
        self.data.len() * bytes_per_value
    }
}

/// Writes tensors to a safetensors file at `path`, atomically (see [`write_atomically`]).
///
/// `metadata` goes into the header's `__metadata__` (Hugging Face writes `{"format": "pt"}`).
/// Errors if a shape does not match its data length, or if a finite value would not be finite
/// in the storage dtype (|x| > 65504 in f16).
pub fn write_tensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, &'a [usize], &'a [f32])>,
    dtype: SaveDtype,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    write_tensors_and_raw(path, tensors, Vec::new(), dtype, metadata)
}

/// A tensor stored as given: (name, dtype, shape, little-endian bytes), e.g. the parts of an
/// NF4 weight ([`crate::nf4_file::nf4_tensors`]).
pub type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// As [`write_tensors`], with `raw` tensors written beside the f32 ones as they are (each must
/// hold exactly the bytes its dtype and shape need).
pub fn write_tensors_and_raw<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, &'a [usize], &'a [f32])>,
    raw: Vec<RawTensor>,
    dtype: SaveDtype,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut views = Vec::new();
    for (name, shape, data) in tensors {
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            let found = data.len();
            let message =
                format!("tensor `{name}`: shape {shape:?} needs {expected} values, found {found}");
            return Err(Error::checkpoint(path, message));
        }
        let overflow = |x: &f32| match dtype {
            SaveDtype::F32 => false,
            SaveDtype::F16 => x.is_finite() && !f16::from_f32(*x).is_finite(),
            SaveDtype::BF16 => x.is_finite() && !bf16::from_f32(*x).is_finite(),
        };
        if let Some(x) = data.iter().find(|x| overflow(x)) {
            let message = format!("tensor `{name}`: value {x} does not fit in {dtype:?}");
            return Err(Error::checkpoint(path, message));
        }
        views.push((name, Stored::Encoded(Encoded { dtype, shape, data })));
    }
    for (name, dtype, shape, bytes) in raw {
        let expected = (shape.iter().product::<usize>() * dtype.bitsize()).div_ceil(8);
        if expected != bytes.len() {
            let found = bytes.len();
            let message = format!(
                "tensor `{name}`: {dtype:?} of shape {shape:?} needs {expected} bytes, found {found}"
            );
            return Err(Error::checkpoint(path, message));
        }
        views.push((
            name,
            Stored::Raw {
                dtype,
                shape,
                bytes,
            },
        ));
    }
    write_atomically(path, |tmp| {
        safetensors::serialize_to_file(views, metadata, tmp)
            .map_err(|e| Error::checkpoint(tmp, format!("cannot write safetensors: {e}")))
    })
}

/// Replaces `path` with what `write` puts in a temporary sibling file, so a reader (or a crash)
/// sees either the old file whole or the new file whole, never a torn one:
/// write `path`'s sibling `.{name}.tmp.{pid}` → fsync it → rename over `path` → fsync the
/// directory so the rename itself is on disk (best effort: not every platform can open a
/// directory). The temporary file is removed if any step fails.
pub fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary_sibling(path);
    let result = write(&tmp).and_then(|()| {
        // fsync acts on the file, not on the handle: a fresh read-only handle flushes what
        // `write` wrote through its own.
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let _ = File::open(dir).and_then(|d| d.sync_all());
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (see [`write_atomically`]).
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomically(path, |tmp| {
        File::create(tmp)
            .and_then(|mut f| f.write_all(bytes))
            .map_err(|e| Error::io(tmp, e))
    })
}

fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("transformer-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn f32_f16_bf16_round_trip_to_their_precision() {
        let dir = temp_dir("tensor-file");
        let data = [1.0f32, -2.5, 0.1, 1e-3, 300.0, 0.0];
        for dtype in [SaveDtype::F32, SaveDtype::F16, SaveDtype::BF16] {
            let path = dir.join(format!("{dtype:?}.safetensors"));
            write_tensors(
                &path,
                [("x".to_string(), &[2usize, 3][..], &data[..])],
                dtype,
                None,
            )
            .unwrap();
            let read = read_tensors(&path).unwrap();
            assert_eq!(
                (read[0].0.as_str(), read[0].1.as_slice()),
                ("x", &[2usize, 3][..])
            );
            // Relative spacing of representable values: 2^-23 (f32), 2^-10 (f16), 2^-7 (bf16).
            let tol = match dtype {
                SaveDtype::F32 => 0.0,
                SaveDtype::F16 => 1.0 / 1024.0,
                SaveDtype::BF16 => 1.0 / 128.0,
            };
            for (a, b) in data.iter().zip(&read[0].2) {
                assert!(
                    (a - b).abs() <= tol * a.abs(),
                    "{dtype:?}: {a} read back as {b}"
                );
            }
        }
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 3, "no temporary file is left behind: {left:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_values_f16_cannot_hold_and_shapes_that_lie() {
        let dir = temp_dir("tensor-file-errors");
        let path = dir.join("m.safetensors");
        let big = [1.0f32, 70000.0];
        let e = write_tensors(
            &path,
            [("w".to_string(), &[2usize][..], &big[..])],
            SaveDtype::F16,
            None,
        );
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("tensor `w`: value 70000 does not fit in F16")
        );
        let e = write_tensors(
            &path,
            [("w".to_string(), &[3usize][..], &big[..])],
            SaveDtype::F32,
            None,
        );
        assert!(
            e.unwrap_err()
                .to_string()
                .contains("shape [3] needs 3 values, found 2")
        );
        assert!(!path.exists());
        std::fs::write(&path, b"not a safetensors file").unwrap();
        let e = read_tensors(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&path.display().to_string()) && e.contains("not a readable safetensors"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
