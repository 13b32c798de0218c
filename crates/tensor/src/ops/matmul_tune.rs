//! Autotuning the GPU matrix product: which kernel ([`GpuMatmul::Tile64`],
//! [`GpuMatmul::Tile128`], [`GpuMatmul::SplitK`] or [`GpuMatmul::Coop`]) is faster for a class of shapes on this
//! adapter, measured at the
//! first product of the class and remembered on disk, so each vendor's driver gets the kernel
//! that suits it (burn's CubeCL tunes the same way).
//!
//! - **Class**: the transposes and the binary order of magnitude (⌈log₂⌉) of M, N and K, so the
//!   output layer, the MLP and the attention projections of one model each get their own answer,
//!   but a product that differs by a few rows does not cost a new measurement. A product the
//!   split-K rule would split (`matmul_splitk.rs`) is a class of its own (text suffix
//!   ` splitk`), measured with split-K among the candidates; so a cache written before split-K
//!   existed is measured again for those products rather than trusted. Likewise a product the
//!   cooperative-matrix kernel can take on this device (`matmul_coop.rs`) is a class of its
//!   own (suffix ` coop`).
//! - **Candidates** (`candidates`): `Tile64` always, `Tile128` where it fits (`tiled_fits`),
//!   `SplitK` where the rule splits the product, `Coop` where the device has a configuration
//!   for it; with one candidate nothing is measured.
//! - **Measurement**: the candidates run the product itself, on its own operands, into a scratch
//!   output (so a product that accumulates into C is not disturbed), once to warm up and then
//!   [`RUNS`] times, each kernel between two waits for the GPU; the faster wall time wins. It
//!   costs a few waits once per class and process (after that, one hash lookup per dispatch).
//! - **Cache file**: one line per adapter and class, `adapter⇥class⇥kernel`, where the adapter is
//!   its name, backend and driver (a driver update is a new adapter). It is read when a class is
//!   first needed, and written again after each measurement; at
//!   [`cache_path`] (`$TENSOR_MATMUL_TUNE_CACHE`, else `$XDG_CACHE_HOME/lora-gpu/matmul-tune.tsv`,
//!   else `~/.cache/lora-gpu/matmul-tune.tsv`). A cache that cannot be read or written only costs
//!   a new measurement next time: tuning never fails a product.
//! - **When**: `--matmul-kernel auto` tunes on hardware adapters; on software ones (lavapipe,
//!   where CI runs) and in dry runs (nothing executes) it keeps `matmul_tiled`'s rule.
//!   `--matmul-kernel tune` tunes on any adapter.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use super::matmul_tiled::{Dispatch, GpuMatmul, tiled_fits};
use crate::Result;
use crate::gpu::GpuContext;

/// Timed runs of each kernel after its warm-up.
pub const RUNS: u32 = 3;

/// A class of products: transposes, ⌈log₂⌉ of M, N, K, B's storage (f32 or f16), and whether
/// split-K and the cooperative-matrix kernel are candidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Class {
    trans: (bool, bool),
    log2: [u32; 3],
    b_f16: bool,
    split: bool,
    coop: bool,
}

impl Class {
    pub(crate) fn of(d: &Dispatch, split: bool, coop: bool) -> Class {
        let lg = |x: u32| x.max(1).next_power_of_two().trailing_zeros();
        Class {
            trans: (d.trans_a, d.trans_b),
            log2: [lg(d.m), lg(d.n), lg(d.k)],
            b_f16: d.b_f16,
            split,
            coop,
        }
    }

    /// `NT m11 n8 k13` style text (` f16` after it for a B in f16, then ` splitk` for a split-K
    /// class, then ` coop` where the cooperative-matrix kernel is a candidate), the cache file's
    /// middle column.
    fn text(&self) -> String {
        let t = |b: bool| if b { 'T' } else { 'N' };
        let [m, n, k] = self.log2;
        let half = if self.b_f16 { " f16" } else { "" };
        let split = if self.split { " splitk" } else { "" };
        let coop = if self.coop { " coop" } else { "" };
        format!(
            "{}{} m{m} n{n} k{k}{half}{split}{coop}",
            t(self.trans.0),
            t(self.trans.1)
        )
    }

    fn parse(s: &str) -> Option<Class> {
        let mut parts = s.split(' ');
        let mut ts = parts.next()?.chars();
        let flag = |c: Option<char>| match c {
            Some('N') => Some(false),
            Some('T') => Some(true),
            _ => None,
        };
        let trans = (flag(ts.next())?, flag(ts.next())?);
        let mut log2 = [0; 3];
        for (slot, prefix) in log2.iter_mut().zip(["m", "n", "k"]) {
            *slot = parts.next()?.strip_prefix(prefix)?.parse().ok()?;
        }
        let mut next = parts.next();
        let b_f16 = next == Some("f16");
        if b_f16 {
            next = parts.next();
        }
        let split = next == Some("splitk");
        if split {
            next = parts.next();
        }
        let coop = match next {
            None => false,
            Some("coop") => true,
            Some(_) => return None,
        };
        parts.next().is_none().then_some(Class {
            trans,
            log2,
            b_f16,
            split,
            coop,
        })
    }
}

/// The adapter as the cache file names it: name, backend and driver.
pub(crate) fn adapter_key(ctx: &GpuContext) -> &str {
    ctx.tune_key()
}

/// Where the cache file is (module doc).
pub fn cache_path() -> Option<PathBuf> {
    #[cfg(test)]
    if let Some(p) = tests::PATH.with(|p| p.borrow().clone()) {
        return Some(p);
    }
    if let Some(p) = std::env::var_os("TENSOR_MATMUL_TUNE_CACHE") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("lora-gpu").join("matmul-tune.tsv"))
}

/// What this process knows: the file's lines (every adapter's, so writing keeps the others),
/// and whether the file was read yet.
#[derive(Default)]
struct Known {
    read: bool,
    /// By adapter, then class (looked up by `&str`, so a dispatch allocates nothing).
    answers: HashMap<String, HashMap<Class, GpuMatmul>>,
}

fn known() -> &'static Mutex<Known> {
    static KNOWN: OnceLock<Mutex<Known>> = OnceLock::new();
    KNOWN.get_or_init(Default::default)
}

fn read_file(k: &mut Known) {
    k.read = true;
    let Some(text) = cache_path().and_then(|p| std::fs::read_to_string(p).ok()) else {
        return;
    };
    for line in text.lines() {
        let mut cols = line.split('\t');
        let (Some(adapter), Some(class), Some(kernel)) = (cols.next(), cols.next(), cols.next())
        else {
            continue;
        };
        let (Some(class), Ok(kernel)) = (Class::parse(class), GpuMatmul::parse(kernel)) else {
            continue;
        };
        k.answers
            .entry(adapter.to_string())
            .or_default()
            .insert(class, kernel);
    }
}

fn write_file(k: &Known) {
    let Some(path) = cache_path() else { return };
    let mut lines: Vec<String> = k
        .answers
        .iter()
        .flat_map(|(adapter, classes)| {
            classes.iter().map(move |(class, kernel)| {
                format!("{adapter}\t{}\t{}", class.text(), kernel.name())
            })
        })
        .collect();
    lines.sort();
    let text = lines.join("\n") + "\n";
    // Written beside and renamed, so a reader never sees half a file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&tmp, text))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// The remembered kernel for `class` on `adapter`, reading the cache file the first time.
pub(crate) fn remembered(adapter: &str, class: Class) -> Option<GpuMatmul> {
    let mut k = known().lock().unwrap_or_else(|p| p.into_inner());
    if !k.read {
        read_file(&mut k);
    }
    k.answers.get(adapter)?.get(&class).copied()
}

fn remember(adapter: &str, class: Class, kernel: GpuMatmul) {
    let mut k = known().lock().unwrap_or_else(|p| p.into_inner());
    k.answers
        .entry(adapter.to_string())
        .or_default()
        .insert(class, kernel);
    write_file(&k);
}

/// Forget what this process knows, so the next lookup reads the cache file again (tests).
#[cfg(test)]
pub(crate) fn forget() {
    *known().lock().unwrap() = Known::default();
}

/// Measurements made by this process (tests check that a class is measured once).
pub(crate) static MEASURED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The kernels measured for `d`: `Tile64`, then `Tile128` where it fits, `SplitK` where
/// `split` (its rule splits the product), `Coop` where `coop` (the device has a
/// cooperative-matrix configuration for it).
pub(crate) fn candidates(d: &Dispatch, split: bool, coop: bool) -> Vec<GpuMatmul> {
    let mut candidates = vec![GpuMatmul::Tile64];
    if tiled_fits(d) {
        candidates.push(GpuMatmul::Tile128);
    }
    if split {
        candidates.push(GpuMatmul::SplitK);
    }
    if coop {
        candidates.push(GpuMatmul::Coop);
    }
    candidates
}

/// The kernel for `d` on `ctx`, measured now if its class has no answer yet; `split`: the
/// split-K rule splits this product, so `SplitK` is a candidate; `coop`: so is `Coop`.
/// `run(kernel)` records the product with `kernel` into a scratch output and returns when it
/// is recorded.
pub(crate) fn tuned(
    ctx: &GpuContext,
    d: &Dispatch,
    split: bool,
    coop: bool,
    run: impl Fn(GpuMatmul) -> Result<()>,
) -> Result<GpuMatmul> {
    let candidates = candidates(d, split, coop);
    if candidates.len() == 1 {
        return Ok(GpuMatmul::Tile64);
    }
    let adapter = adapter_key(ctx);
    let class = Class::of(d, split, coop);
    if let Some(k) = remembered(adapter, class) {
        return Ok(k);
    }
    let mut best = (f64::INFINITY, GpuMatmul::Tile64);
    for kernel in candidates {
        run(kernel)?;
        ctx.sync()?;
        let start = Instant::now();
        for _ in 0..RUNS {
            run(kernel)?;
        }
        ctx.sync()?;
        let secs = start.elapsed().as_secs_f64();
        if secs < best.0 {
            best = (secs, kernel);
        }
    }
    MEASURED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    remember(adapter, class, best.1);
    Ok(best.1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// The cache file of this test thread (the environment is shared by every test).
        pub(crate) static PATH: std::cell::RefCell<Option<PathBuf>> = const { std::cell::RefCell::new(None) };
    }

    #[test]
    fn classes_round_trip_through_their_text() {
        let d = Dispatch {
            m: 8192,
            n: 768,
            k: 50_257,
            trans_a: true,
            trans_b: false,
            ld: [768; 3],
            off: [0; 3],
            stride: [0; 3],
            off_bias: None,
            b_f16: false,
            epilogue: None,
        };
        let c = Class::of(&d, false, false);
        assert_eq!(c.text(), "TN m13 n10 k16");
        assert_eq!(Class::parse(&c.text()), Some(c));
        let s = Class::of(&d, true, false);
        assert_eq!(s.text(), "TN m13 n10 k16 splitk");
        assert_eq!(Class::parse(&s.text()), Some(s));
        assert_eq!(Class::parse("TN m13 n10 k16 tile64"), None);
        let half = Class::of(&Dispatch { b_f16: true, ..d }, true, false);
        assert_eq!(half.text(), "TN m13 n10 k16 f16 splitk");
        assert_eq!(Class::parse(&half.text()), Some(half));
        let coop = Class::of(&Dispatch { b_f16: true, ..d }, true, true);
        assert_eq!(coop.text(), "TN m13 n10 k16 f16 splitk coop");
        assert_eq!(Class::parse(&coop.text()), Some(coop));
        assert_eq!(Class::parse("TN m13 n10 k16 coop splitk"), None);
        assert_eq!(
            candidates(&d, false, false),
            [GpuMatmul::Tile64, GpuMatmul::Tile128]
        );
        assert_eq!(
            candidates(&d, true, true),
            [
                GpuMatmul::Tile64,
                GpuMatmul::Tile128,
                GpuMatmul::SplitK,
                GpuMatmul::Coop
            ]
        );
        assert_eq!(Class::parse("TN m13 n10 k16 f8"), None);
        assert_eq!(Class::parse("TN m13 n10 k16 splitk f16"), None);
        assert_eq!(Class::parse("XN m1 n2 k3"), None);
        assert_eq!(Class::parse("NN m1 n2"), None);
    }
}
