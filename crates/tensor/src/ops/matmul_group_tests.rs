//! Tests of `ops/matmul_group.rs`: grouped products against the f64 oracle on the CPU and on the
//! GPU, in every layout the launcher distinguishes (one dispatch or one per product), on both
//! kernels, with split bindings, and the errors. This file builds the cases (layouts, operands,
//! LoRA's six products); `matmul_group_checks.rs` runs them.
use std::sync::OnceLock;

use proptest::prelude::*;

use super::*;
use crate::ops::matmul::{MatView, MatmulOpts, matmul_into};
use crate::ops::matmul_tiled::{GpuMatmul, tests::forced};
use crate::reference::{self, widen};
use crate::testing::{assert_close_slices, gpu, gpu_with_binding_limit, random_vec};

/// What the elements around the views hold: a product that reads or writes outside its view
/// shows.
const JUNK: f32 = 9.0;

/// How the g views of one operand lie.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Layout {
    /// One tensor per view (g buffers: never one dispatch, unless g = 1).
    Separate,
    /// One view for the whole group (A or B only): stride 0.
    Shared,
    /// Column blocks of one wide tensor, `gap` columns apart (stride cols + gap).
    Columns { gap: usize },
    /// Column blocks of one wide tensor at irregular steps (the gaps 0, 1, 2, …).
    Ragged,
    /// GPU: views of one allocation, `gap` elements apart (stride rows·cols + gap), like the
    /// optimizer's arena; in decreasing order with `reversed`. On the CPU: `Separate`.
    Slots { gap: usize, reversed: bool },
}

impl Layout {
    /// Whether the views of g > 1 products are at one step in one buffer on `device`.
    fn regular(self, device: &Device, g: usize) -> bool {
        match self {
            Layout::Separate => false,
            Layout::Ragged => g <= 2,
            Layout::Slots { .. } => device.is_gpu(),
            Layout::Shared | Layout::Columns { .. } => true,
        }
    }
}

/// The tensors holding one operand's views, and where each view is.
struct Operand {
    tensors: Vec<Tensor>,
    /// Per view: (index into `tensors`, col0, cols).
    views: Vec<(usize, usize, usize)>,
    /// Per tensor, the elements no view covers (they must keep `JUNK`).
    outside: Vec<Vec<bool>>,
}

impl Operand {
    /// The views of `blocks` (each `rows × cols`, row-major) laid out as `layout` says.
    fn new(layout: Layout, rows: usize, cols: usize, blocks: &[Vec<f32>], device: &Device) -> Self {
        let g = blocks.len();
        let col0s: Vec<usize> = match layout {
            Layout::Columns { gap } => (0..g).map(|z| z * (cols + gap)).collect(),
            Layout::Ragged => (0..g).map(|z| z * cols + z * (z + 1) / 2).collect(),
            _ => vec![0; g],
        };
        match layout {
            Layout::Columns { .. } | Layout::Ragged => {
                let trailing = match layout {
                    Layout::Columns { gap } => gap,
                    _ => 1,
                };
                let ld = col0s[g - 1] + cols + trailing;
                let mut data = vec![JUNK; rows * ld];
                let mut outside = vec![true; rows * ld];
                for (block, &c0) in blocks.iter().zip(&col0s) {
                    for i in 0..rows {
                        for j in 0..cols {
                            data[i * ld + c0 + j] = block[i * cols + j];
                            outside[i * ld + c0 + j] = false;
                        }
                    }
                }
                Operand {
                    tensors: vec![Tensor::from_vec(data, &[rows, ld], device).unwrap()],
                    views: col0s.iter().map(|&c0| (0, c0, cols)).collect(),
                    outside: vec![outside],
                }
            }
            Layout::Slots { gap, reversed } if device.is_gpu() => {
                let step = rows * cols + gap;
                let len = g * step + 3;
                let (mut data, mut outside) = (vec![JUNK; len], vec![true; len]);
                let slot = |z: usize| if reversed { g - 1 - z } else { z } * step;
                for (z, block) in blocks.iter().enumerate() {
                    data[slot(z)..slot(z) + block.len()].copy_from_slice(block);
                    outside[slot(z)..slot(z) + block.len()].fill(false);
                }
                let root = Tensor::from_vec(data, &[len], device).unwrap();
                let mut tensors: Vec<Tensor> = (0..g)
                    .map(|z| root.view(slot(z), &[rows, cols]).unwrap())
                    .collect();
                tensors.push(root);
                Operand {
                    tensors,
                    views: (0..g).map(|z| (z, 0, cols)).collect(),
                    outside: vec![vec![false; rows * cols]; g]
                        .into_iter()
                        .chain([outside])
                        .collect(),
                }
            }
            _ => Operand {
                tensors: blocks
                    .iter()
                    .map(|b| Tensor::from_vec(b.clone(), &[rows, cols], device).unwrap())
                    .collect(),
                views: (0..g).map(|z| (z, 0, cols)).collect(),
                outside: vec![vec![false; rows * cols]; g],
            },
        }
    }

    fn mat_views(&self) -> Vec<MatView<'_>> {
        self.views
            .iter()
            .map(|&(t, c0, cols)| MatView::cols(&self.tensors[t], c0, cols))
            .collect()
    }

    /// The values of view z, row-major.
    fn block(&self, z: usize) -> Vec<f32> {
        let (t, c0, cols) = self.views[z];
        let t = &self.tensors[t];
        let ld = t.last_dim();
        if cols == 0 {
            return Vec::new();
        }
        t.to_vec()
            .unwrap()
            .chunks(ld)
            .flat_map(|row| row[c0..c0 + cols].to_vec())
            .collect()
    }

    /// Every element outside the views still holds `JUNK`.
    fn assert_untouched(&self, what: &str) {
        for (t, outside) in self.tensors.iter().zip(&self.outside) {
            let v = t.to_vec().unwrap();
            for (i, (&x, &out)) in v.iter().zip(outside).enumerate() {
                assert!(
                    !out || x == JUNK,
                    "{what}: element {i} outside the views is {x}"
                );
            }
        }
    }
}

/// One grouped problem: g products op(A_z): (M, K), op(B_z): (K, N), and each operand's layout.
#[derive(Clone, Debug)]
struct GroupCase {
    g: usize,
    m: usize,
    k: usize,
    n: usize,
    o: MatmulOpts,
    alpha: f32,
    accumulate: bool,
    layouts: [Layout; 3],
}

impl GroupCase {
    /// Stored (rows, cols) of A, B and C.
    fn stored(&self) -> [(usize, usize); 3] {
        let (m, k, n) = (self.m, self.k, self.n);
        [
            if self.o.trans_a { (k, m) } else { (m, k) },
            if self.o.trans_b { (n, k) } else { (k, n) },
            (m, n),
        ]
    }

    /// A, B, C on `device`: the same view values for the same seed, whatever the layout.
    fn operands(&self, seed: u64, device: &Device) -> [Operand; 3] {
        let stored = self.stored();
        std::array::from_fn(|i| {
            let (rows, cols) = stored[i];
            let count = if self.layouts[i] == Layout::Shared {
                1
            } else {
                self.g
            };
            let blocks: Vec<Vec<f32>> = (0..count)
                .map(|z| random_vec(rows * cols, seed + 10 * i as u64 + z as u64))
                .collect();
            Operand::new(self.layouts[i], rows, cols, &blocks, device)
        })
    }

    /// Run the group on `ops`; the dispatches it took on a GPU (0 on the CPU).
    fn run(&self, ops: &[Operand; 3]) -> u64 {
        let [a, b, c] = ops;
        let count = |t: &Tensor| match t.device() {
            Device::Gpu(ctx) => ctx.dispatch_count(),
            Device::Cpu(_) => 0,
        };
        let before = count(&c.tensors[0]);
        matmul_into_group(
            &c.mat_views(),
            &a.mat_views(),
            &b.mat_views(),
            self.o,
            self.alpha,
            self.accumulate,
        )
        .unwrap();
        count(&c.tensors[0]) - before
    }

    /// C_z = α·op(A_z)·op(B_z) (+ the old C_z), in f64 from the views' values.
    fn oracle(&self, ops: &[Operand; 3]) -> Vec<Vec<f32>> {
        let [a, b, c] = ops;
        let pick = |op: &Operand, z: usize| op.block(if op.views.len() == 1 { 0 } else { z });
        (0..self.g)
            .map(|z| {
                let p = reference::matmul(
                    &widen(&pick(a, z)),
                    &widen(&pick(b, z)),
                    None,
                    [1, self.m, self.k, self.n],
                    self.o,
                );
                let old = c.block(z);
                p.iter()
                    .zip(&old)
                    .map(|(p, &o)| {
                        (self.alpha as f64 * p + if self.accumulate { o as f64 } else { 0.0 })
                            as f32
                    })
                    .collect()
            })
            .collect()
    }

    /// Whether one product is one dispatch: the launcher cuts a dimension of 4 or more that is
    /// not a multiple of 4 into its multiple of 4 and the rest (`launch_2d`), so that the bulk
    /// stays readable as vec4s; a batched dispatch does not.
    fn unsplit(&self) -> bool {
        [self.m, self.k, self.n]
            .iter()
            .all(|&d| d < 4 || d % 4 == 0)
    }

    fn dispatches_expected(&self, device: &Device) -> u64 {
        let one = self.layouts.iter().all(|l| l.regular(device, self.g)) || self.g == 1;
        if one { 1 } else { self.g as u64 }
    }

    /// Run on `device` and check against the oracle, the elements around C's views, and (with
    /// `count`, on a context of its own) the dispatches; returns C's blocks.
    fn check(&self, seed: u64, device: &Device, count: bool) -> Vec<Vec<f32>> {
        let what = format!("{self:?} on {device:?}");
        let ops = self.operands(seed, device);
        let want = self.oracle(&ops);
        let dispatches = self.run(&ops);
        if count && device.is_gpu() && self.unsplit() {
            assert_eq!(dispatches, self.dispatches_expected(device), "{what}");
        }
        let atol = 2e-5 * self.k.max(1) as f32;
        let got: Vec<Vec<f32>> = (0..self.g).map(|z| ops[2].block(z)).collect();
        for z in 0..self.g {
            assert_close_slices(
                &format!("{what}, product {z}"),
                &got[z],
                &want[z],
                atol,
                1e-5,
            );
        }
        for op in &ops {
            op.assert_untouched(&what);
        }
        got
    }
}

fn opts(trans_a: bool, trans_b: bool) -> MatmulOpts {
    MatmulOpts { trans_a, trans_b }
}

const TRANSPOSES: [MatmulOpts; 4] = [
    MatmulOpts {
        trans_a: false,
        trans_b: false,
    },
    MatmulOpts {
        trans_a: false,
        trans_b: true,
    },
    MatmulOpts {
        trans_a: true,
        trans_b: false,
    },
    MatmulOpts {
        trans_a: true,
        trans_b: true,
    },
];

/// A GPU context of its own, so that its dispatch count is this module's alone (tests run in
/// parallel on the shared one). Only while one test counts at a time: a lock serialises them.
fn counting_gpu() -> Option<(Device, std::sync::MutexGuard<'static, ()>)> {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    gpu()?;
    let d = DEVICE
        .get_or_init(|| gpu_with_binding_limit(u64::MAX))
        .clone();
    Some((d, LOCK.lock().unwrap_or_else(|e| e.into_inner())))
}

/// LoRA's six products for g = 2 parts: x (N, in) shared, A_z (r, in) and B_z (w, r) in slots,
/// h (N, g·r) and dp column blocks, y's and dy's column blocks (the c_attn layout).
fn lora_cases() -> Vec<GroupCase> {
    let (rows, n_in, r, w) = (12, 16, 4, 8);
    let slots = Layout::Slots {
        gap: 8,
        reversed: false,
    };
    let h_cols = Layout::Columns { gap: 0 };
    let y_cols = Layout::Columns { gap: w };
    let case = |m, k, n, o, alpha, accumulate, layouts| GroupCase {
        g: 2,
        m,
        k,
        n,
        o,
        alpha,
        accumulate,
        layouts,
    };
    vec![
        // h_z = s·x·A_zᵀ
        case(
            rows,
            n_in,
            r,
            opts(false, true),
            0.5,
            false,
            [Layout::Shared, slots, h_cols],
        ),
        // y[:, col0_z..] += h_z·B_zᵀ
        case(
            rows,
            r,
            w,
            opts(false, true),
            1.0,
            true,
            [h_cols, slots, y_cols],
        ),
        // dB_z = dy_zᵀ·h_z
        case(
            w,
            rows,
            r,
            opts(true, false),
            1.0,
            false,
            [y_cols, h_cols, slots],
        ),
        // dp_z = s·dy_z·B_z
        case(
            rows,
            w,
            r,
            opts(false, false),
            0.5,
            false,
            [y_cols, slots, h_cols],
        ),
        // dA_z = dp_zᵀ·x
        case(
            r,
            rows,
            n_in,
            opts(true, false),
            1.0,
            false,
            [h_cols, Layout::Shared, slots],
        ),
    ]
}

#[path = "matmul_group_checks.rs"]
mod checks;
