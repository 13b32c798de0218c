//! The second-generation GPU matrix product (`shaders/matmul_tiled.wgsl`), and which kernel
//! computes a product: the variants, the rule that picks one per dispatch, and the switch that
//! forces one (`train --matmul-kernel`, or [`set_gpu_matmul`]). The launcher is
//! [`matmul`](crate::ops::matmul)'s: both kernels share its `Params`, bindings and splits.
//!
//! - [`GpuMatmul::Tile64`] — `shaders/matmul.wgsl`, the first kernel: 64×64 output tiles, 4×4
//!   outputs per invocation, scalar loads, K slices of 16 staged once with two barriers per slice,
//!   the transposes read from `Params` in the inner loop. It takes every shape, offset and
//!   stride, so it is also the fallback.
//! - [`GpuMatmul::Tile128`] — `shaders/matmul_tiled.wgsl`, the second generation: 128×128 tiles,
//!   8×8 outputs per invocation (64 multiply-adds per four vec4 reads of workgroup memory),
//!   vec4 global loads, K slices of 8 double-buffered with one barrier per slice, and one
//!   pipeline per transpose case (WGSL `override` constants, so the branches fold away when the
//!   pipeline is made). It needs every operand readable as whole vec4s (`tiled_fits`: every
//!   offset, leading dimension, batch stride and contiguous extent a multiple of 4).
//! - [`GpuMatmul::SplitK`] — `shaders/matmul_splitk.wgsl`: K cut into slices, partial products
//!   into a scratch buffer, then their sum into C (two dispatches), for outputs too small to
//!   fill a GPU: LoRA's weight gradients (`matmul_splitk.rs`). Any shape when forced.
//!
//! - [`GpuMatmul::Coop`] — `shaders/matmul_coop.wgsl`: the adapter's matrix units through
//!   cooperative matrices, where the adapter offers a configuration for the product
//!   (`matmul_coop.rs`); forcing it on an adapter without one is an error naming what is missing.
//!
//! [`GpuMatmul::Auto`] (the default) measures which kernel is faster for each class of shapes on a
//! hardware adapter, once, and remembers it on disk ([`matmul_tune`](super::matmul_tune)). On a
//! software adapter, in a dry run, and for the shapes only `Tile64` takes, a rule decides: `Tile128`
//! for a product it fits whose M and N are both at least 128 (one full tile: smaller outputs
//! would leave most of its invocations idle), `Tile64` otherwise: LoRA's thin products (M or N =
//! r) and odd shapes such as the output layer's `dlogits·W` with K = 50,257; and before either,
//! `SplitK` where its rule splits K (at most 128 tiles of 64 × 64 and K ≥ 512:
//! `matmul_splitk.rs`'s `rule_slices`).
//!
//! Design estimate (no hardware GPU was at hand to time them): per K step of one invocation,
//! `Tile64` does 16 multiply-adds for 5 workgroup-memory reads and `Tile128` 64 for 4 vec4
//! reads; on GPUs whose fp32 SGEMMs reach 70–90 % of peak with 8×8 register blocks (the CUDA
//! SGEMM literature's usual figure), `Tile64`'s 4×4 blocks are bounded by workgroup-memory
//! bandwidth at roughly a third to a half of peak.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::gpu::Kernel;
use crate::shaders;

/// A GPU matrix-product kernel (module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuMatmul {
    /// On a hardware adapter, the kernel measured fastest for the product's class
    /// ([`matmul_tune`](super::matmul_tune)); on a software one or in a dry run, `Tile128` where
    /// it fits and the output has at least one full tile, else `Tile64`; `SplitK` before
    /// either where its rule splits K.
    Auto,
    /// The measured kernel on any adapter (software ones included); the rule in a dry run.
    Tune,
    /// `shaders/matmul.wgsl`: every shape.
    Tile64,
    /// `shaders/matmul_tiled.wgsl` where it fits (module doc); `Tile64` elsewhere.
    Tile128,
    /// `shaders/matmul_splitk.wgsl`: every shape (`Tile64` only where the scratch of one slice
    /// would not fit a binding).
    SplitK,
    /// `shaders/matmul_coop.wgsl`: every shape, on a device with a cooperative-matrix
    /// configuration for the product (`matmul_coop.rs`); an error elsewhere.
    Coop,
}

impl GpuMatmul {
    /// Every choice, in `--help` order.
    pub const ALL: [GpuMatmul; 6] = [
        GpuMatmul::Auto,
        GpuMatmul::Tune,
        GpuMatmul::Tile64,
        GpuMatmul::Tile128,
        GpuMatmul::SplitK,
        GpuMatmul::Coop,
    ];

    /// The name `parse` reads.
    pub fn name(self) -> &'static str {
        match self {
            GpuMatmul::Auto => "auto",
            GpuMatmul::Tune => "tune",
            GpuMatmul::Tile64 => "tile64",
            GpuMatmul::Tile128 => "tile128",
            GpuMatmul::SplitK => "splitk",
            GpuMatmul::Coop => "coop",
        }
    }

    /// `auto`, `tune`, `tile64`, `tile128`, `splitk` or `coop`.
    pub fn parse(s: &str) -> Result<GpuMatmul, String> {
        GpuMatmul::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = GpuMatmul::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "unknown GPU matmul kernel `{s}`: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

static CHOICE: AtomicU8 = AtomicU8::new(0);

/// Force a kernel for the products recorded from now on (default [`GpuMatmul::Auto`]).
pub fn set_gpu_matmul(kernel: GpuMatmul) {
    let i = GpuMatmul::ALL
        .iter()
        .position(|&k| k == kernel)
        .unwrap_or(0);
    CHOICE.store(i as u8, Ordering::Relaxed);
}

/// The kernel choice in force.
pub fn gpu_matmul() -> GpuMatmul {
    #[cfg(test)]
    if let Some(k) = tests::FORCED.with(|f| f.get()) {
        return k;
    }
    GpuMatmul::ALL[CHOICE.load(Ordering::Relaxed) as usize % GpuMatmul::ALL.len()]
}

/// One dispatch's product as the launcher binds it: sizes, transposes, and every offset,
/// leading dimension and batch stride in f32 elements (bias offset `None` without a bias), and
/// the epilogue with its tensor's offset.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dispatch {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub trans_a: bool,
    pub trans_b: bool,
    pub ld: [u32; 3],
    pub off: [u32; 3],
    pub stride: [u32; 3],
    pub off_bias: Option<u32>,
    /// B is stored in f16, two elements per u32 word ([`matmul_f16`](super::matmul_f16)); its
    /// offset, leading dimension and stride count f16 elements.
    pub b_f16: bool,
    pub epilogue: Option<(super::matmul::Epilogue, u32)>,
}

/// Whether `matmul_tiled.wgsl` can read every operand of `d` as whole vec4s: each offset, leading
/// dimension and batch stride a multiple of 4, and so the extent of each operand's contiguous
/// axis (A: K, or M when transposed; B: N, or K when transposed; C and bias: N). Then a vec4
/// lies wholly inside its matrix or wholly outside, and no bound range ends inside a vec4.
/// And K ≥ 1: with K = 0 the launcher binds one element of A and B, less than a vec4.
pub(crate) fn tiled_fits(d: &Dispatch) -> bool {
    let a_run = if d.trans_a { d.m } else { d.k };
    let b_run = if d.trans_b { d.k } else { d.n };
    let words =
        d.ld.iter()
            .chain(&d.off)
            .chain(&d.stride)
            .chain(&d.off_bias)
            .chain(d.epilogue.as_ref().map(|(_, off)| off))
            .chain([&a_run, &b_run, &d.n]);
    // K = 0 binds a single element of A and B (never read): less than one vec4.
    d.k > 0 && words.into_iter().all(|w| w % 4 == 0)
}

/// The kernel `choice` gives `d`: the kernel (the entry point of `d`'s epilogue), its override
/// constants, and its output tile side. (The split-K path is decided before, by
/// `matmul_splitk::plan`; `SplitK` reaches here only where it cannot run, and gets
/// `matmul.wgsl`. `Coop` is recorded by `matmul_coop::record`, which needs the device, and
/// reaches here only for its fallback: `matmul.wgsl`.)
pub(crate) fn pick(
    choice: GpuMatmul,
    d: &Dispatch,
) -> (Kernel, &'static [(&'static str, f64)], u32) {
    let tiled = match choice {
        GpuMatmul::Tile64 | GpuMatmul::SplitK | GpuMatmul::Coop => false,
        GpuMatmul::Tile128 => tiled_fits(d),
        GpuMatmul::Auto | GpuMatmul::Tune => tiled_fits(d) && d.m >= 128 && d.n >= 128,
    };
    #[cfg(test)]
    tests::TILED.with(|t| t.set(t.get() + u64::from(tiled)));
    let with = |kernel| super::matmul::Epilogue::kernel(d.epilogue.map(|(e, _)| e), kernel);
    let half = usize::from(d.b_f16);
    if !tiled {
        return (
            with(super::matmul::TILE64),
            shaders::MATMUL_VARIANTS[half],
            64,
        );
    }
    let case = 2 * usize::from(d.trans_a) + usize::from(d.trans_b);
    (
        with(TILE128),
        shaders::MATMUL_TILED_VARIANTS[4 * half + case],
        128,
    )
}

/// `shaders/matmul_tiled.wgsl`.
pub(crate) const TILE128: Kernel = Kernel {
    shader: "matmul_tiled",
    source: shaders::MATMUL_TILED,
    entry: "matmul_tiled",
};

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// A kernel forced on this test thread only (the global choice is shared by every test).
        pub(crate) static FORCED: Cell<Option<GpuMatmul>> = const { Cell::new(None) };
        /// Dispatches this thread gave `matmul_tiled.wgsl`.
        pub(crate) static TILED: Cell<u64> = const { Cell::new(0) };
    }

    /// Run `f` with `kernel` forced on this thread; also returns how many of its dispatches took
    /// the tiled kernel.
    pub(crate) fn forced<R>(kernel: GpuMatmul, f: impl FnOnce() -> R) -> (R, u64) {
        let before = TILED.with(Cell::get);
        FORCED.with(|c| c.set(Some(kernel)));
        let r = f();
        FORCED.with(|c| c.set(None));
        (r, TILED.with(Cell::get) - before)
    }

    fn square(n: u32) -> Dispatch {
        Dispatch {
            m: n,
            n,
            k: n,
            trans_a: false,
            trans_b: false,
            ld: [n; 3],
            off: [0; 3],
            stride: [0; 3],
            off_bias: None,
            b_f16: false,
            epilogue: None,
        }
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for k in GpuMatmul::ALL {
            assert_eq!(GpuMatmul::parse(k.name()), Ok(k));
        }
        let e = GpuMatmul::parse("tile256").unwrap_err();
        assert!(
            e.contains("tile256") && e.contains("tile64, tile128"),
            "{e}"
        );
    }

    #[test]
    fn auto_takes_the_tiled_kernel_only_for_whole_vec4s_and_a_full_tile() {
        assert_eq!(pick(GpuMatmul::Auto, &square(256)).0.shader, "matmul_tiled");
        assert_eq!(pick(GpuMatmul::Auto, &square(64)).0.shader, "matmul");
        // The output layer's dx: K = 50,257 runs along A's rows.
        let odd = Dispatch {
            k: 50_257,
            ld: [50_257, 768, 768],
            ..square(768)
        };
        assert!(!tiled_fits(&odd));
        assert_eq!(pick(GpuMatmul::Tile128, &odd).0.shader, "matmul");
        // Transposed, the same K is B's row count, not a contiguous run: it fits.
        let t = Dispatch {
            trans_a: true,
            ld: [768, 768, 768],
            ..odd
        };
        assert!(tiled_fits(&t));
        assert_eq!(
            pick(GpuMatmul::Auto, &t).1,
            shaders::MATMUL_TILED_VARIANTS[2]
        );
        // A B in f16 takes the same kernels, with B_F16 set.
        let half = Dispatch { b_f16: true, ..t };
        assert_eq!(
            pick(GpuMatmul::Auto, &half).1,
            shaders::MATMUL_TILED_VARIANTS[6]
        );
        let odd_half = Dispatch { b_f16: true, ..odd };
        assert_eq!(
            pick(GpuMatmul::Auto, &odd_half).1,
            shaders::MATMUL_VARIANTS[1]
        );
        let shifted = Dispatch {
            off: [0, 2, 0],
            ..square(256)
        };
        assert!(!tiled_fits(&shifted));
        assert_eq!(pick(GpuMatmul::Tile64, &square(256)).2, 64);
    }
}
