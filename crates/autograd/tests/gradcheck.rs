//! Finite differences in f64 against every backward rule.
//!
//! For each op y = f(inputs), the test builds loss = Σ r ⊙ y with a fixed random r, runs our
//! backward (f32, CPU backend), and compares each input's gradient with central differences of
//! the op's f64 forward in `tensor::reference`: (L(x + h) − L(x − h)) / 2h, h = 1e-5. Shapes
//! come from proptest. `a_wrong_backward_is_rejected` keeps the checker honest.

use autograd::{Grads, Param, Tape, Var};
use proptest::prelude::*;
use tensor::ops::matmul::MatmulOpts;
use tensor::reference::{self, numeric_gradient, widen};
use tensor::testing::random_vec;
use tensor::{Device, Tensor};

type Build = dyn Fn(&Tape, &[Var]) -> tensor::Result<Var>;
type Reference = dyn Fn(&[Vec<f64>]) -> Vec<f64>;

/// Compare our gradients with f64 finite differences; Err describes the first mismatch.
fn check(
    name: &str,
    shapes: &[Vec<usize>],
    build: &Build,
    reference: &Reference,
    seed: u64,
) -> Result<(), String> {
    let cpu = Device::cpu();
    let values: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| random_vec(s.iter().product(), seed + i as u64))
        .collect();
    let params: Vec<Param> = values
        .iter()
        .zip(shapes)
        .map(|(v, s)| Param::trainable("x", Tensor::from_vec(v.clone(), s, &cpu).unwrap()))
        .collect();
    let tape = Tape::new();
    let vars: Vec<Var> = params.iter().map(|p| tape.param(p)).collect();
    let y = build(&tape, &vars).map_err(|e| e.to_string())?;
    let r = random_vec(y.value.numel(), seed + 100);
    let rv = tape.constant(Tensor::from_vec(r.clone(), y.shape(), &cpu).unwrap());
    let loss = tape.sum_all(&tape.mul(&y, &rv).unwrap()).unwrap();
    let mut grads = Grads::new();
    tape.backward(&loss, &mut grads)
        .map_err(|e| e.to_string())?;

    let x64: Vec<Vec<f64>> = values.iter().map(|v| widen(v)).collect();
    let lossf = |xs: &[Vec<f64>]| -> f64 {
        reference(xs)
            .iter()
            .zip(&r)
            .map(|(y, r)| y * *r as f64)
            .sum()
    };
    for (i, p) in params.iter().enumerate() {
        let ours = match grads.get(p.as_trainable().unwrap().id) {
            Some(g) => g.to_vec().unwrap(),
            None => vec![0.0; values[i].len()],
        };
        let mut xs = x64.clone();
        let fds = numeric_gradient(
            |xi| {
                xs[i] = xi.to_vec();
                lossf(&xs)
            },
            &x64[i],
            1e-5,
        );
        for (j, &fd) in fds.iter().enumerate() {
            let got = ours[j] as f64;
            if (got - fd).abs() > 1e-3 + 1e-3 * fd.abs() {
                return Err(format!(
                    "{name}: input {i} element {j}: backward {got}, finite difference {fd}"
                ));
            }
        }
    }
    Ok(())
}

fn dims() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(7), 2usize..6]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn matmul_backward_matches_finite_differences(m in dims(), k in dims(), n in dims(),
                                                  ta: bool, tb: bool, bias: bool, seed in 0u64..1000) {
        let a = if ta { vec![k, m] } else { vec![m, k] };
        let b = if tb { vec![n, k] } else { vec![k, n] };
        let mut shapes = vec![a, b];
        if bias { shapes.push(vec![n]); }
        let opts = MatmulOpts { trans_a: ta, trans_b: tb };
        check("matmul", &shapes,
            &move |t, v| t.matmul(&v[0], &v[1], v.get(2), opts),
            &move |x| reference::matmul(&x[0], &x[1], x.get(2).map(|b| b.as_slice()), [1, m, k, n], opts),
            seed).unwrap();
    }

    #[test]
    fn batched_matmul_with_shared_weight_matches_finite_differences(b in 1usize..3, t in dims(), k in dims(), n in dims(), seed in 0u64..1000) {
        check("batched matmul", &[vec![b, t, k], vec![k, n]],
            &|tp, v| tp.matmul(&v[0], &v[1], None, MatmulOpts::default()),
            &move |x| reference::matmul(&x[0], &x[1], None, [1, b * t, k, n], MatmulOpts::default()),
            seed).unwrap();
    }

    #[test]
    fn elementwise_backward_matches_finite_differences(r in dims(), c in dims(), seed in 0u64..1000) {
        let s = vec![r, c];
        check("add", &[s.clone(), s.clone()], &|t, v| t.add(&v[0], &v[1]),
            &|x| x[0].iter().zip(&x[1]).map(|(a, b)| a + b).collect(), seed).unwrap();
        check("mul", &[s.clone(), s.clone()], &|t, v| t.mul(&v[0], &v[1]),
            &|x| x[0].iter().zip(&x[1]).map(|(a, b)| a * b).collect(), seed).unwrap();
        check("scale", std::slice::from_ref(&s), &|t, v| t.scale(&v[0], -0.7),
            &|x| x[0].iter().map(|a| -0.7 * a).collect(), seed).unwrap();
        check("add_bias", &[s.clone(), vec![c]], &|t, v| t.add_bias(&v[0], &v[1]),
            &move |x| x[0].iter().enumerate().map(|(i, a)| a + x[1][i % c]).collect(), seed).unwrap();
        check("gelu", std::slice::from_ref(&s), &|t, v| t.gelu(&v[0]), &|x| reference::gelu(&x[0]), seed).unwrap();
        check("mean_all", std::slice::from_ref(&s), &|t, v| t.mean_all(&v[0]),
            &|x| vec![x[0].iter().sum::<f64>() / x[0].len() as f64], seed).unwrap();
    }

    #[test]
    fn softmax_backward_matches_finite_differences(b in 1usize..3, r in dims(), c in dims(), causal: bool, seed in 0u64..1000) {
        let c = c.max(r); // causal rows need at least as many columns
        check("softmax", &[vec![b, r, c]], &move |t, v| t.softmax(&v[0], causal),
            &move |x| reference::softmax(&x[0], r, c, causal), seed).unwrap();
    }

    #[test]
    fn layernorm_backward_matches_finite_differences(r in dims(), c in 2usize..9, seed in 0u64..1000) {
        check("layernorm", &[vec![r, c], vec![c], vec![c]],
            &|t, v| t.layernorm(&v[0], &v[1], &v[2], 1e-5),
            &|x| reference::layernorm(&x[0], &x[1], &x[2], 1e-5), seed).unwrap();
    }

    #[test]
    fn embedding_backward_matches_finite_differences(v in 1usize..6, c in dims(), ids in proptest::collection::vec(0u32..6, 1..8), seed in 0u64..1000) {
        let ids: Vec<u32> = ids.into_iter().map(|i| i % v as u32).collect();
        let ids2 = ids.clone();
        let (ids3, ids4) = (ids.clone(), ids.clone());
        check("embedding", &[vec![v, c]], &move |t, x| t.embedding(&x[0], &ids),
            &move |x| reference::embedding(&x[0], &ids2, c), seed).unwrap();
        check("gather_rows", &[vec![v, c]], &move |t, x| t.gather_rows(&x[0], &ids3),
            &move |x| reference::embedding(&x[0], &ids4, c), seed).unwrap();
    }

    #[test]
    fn cross_entropy_backward_matches_finite_differences(n in 1usize..6, v in 2usize..9, seed in 0u64..1000) {
        let targets: Vec<u32> = (0..n).map(|i| ((i * 7 + seed as usize) % v) as u32).collect();
        let weights: Vec<f32> = (0..n).map(|i| if i % 3 == 1 { 0.0 } else { 1.0 }).collect();
        let weights = if weights.iter().sum::<f32>() == 0.0 { vec![1.0; n] } else { weights };
        let (t2, w2) = (targets.clone(), weights.iter().map(|&w| w as f64).collect::<Vec<_>>());
        check("cross_entropy", &[vec![n, v]], &move |t, x| t.cross_entropy(&x[0], &targets, &weights),
            &move |x| vec![reference::cross_entropy(&x[0], v, &t2, &w2)], seed).unwrap();
    }

    #[test]
    fn linear_cross_entropy_backward_matches_finite_differences(n in 1usize..6, c in dims(), v in 2usize..9, seed in 0u64..1000) {
        let targets: Vec<u32> = (0..n).map(|i| ((i * 5 + seed as usize) % v) as u32).collect();
        let weights: Vec<f32> = (0..n).map(|i| if i % 3 == 1 { 0.0 } else { 0.5 + i as f32 }).collect();
        let weights = if weights.iter().sum::<f32>() == 0.0 { vec![1.0; n] } else { weights };
        let (t2, w2) = (targets.clone(), weights.iter().map(|&w| w as f64).collect::<Vec<_>>());
        // Loss of the logits h·Wᵀ, h: (n, c), W: (v, c); gradients for both.
        check("linear_cross_entropy", &[vec![n, c], vec![v, c]],
            &move |t, x| t.linear_cross_entropy(&x[0], &x[1], &targets, &weights),
            &move |x| {
                let tb = MatmulOpts { trans_a: false, trans_b: true };
                let logits = reference::matmul(&x[0], &x[1], None, [1, n, c, v], tb);
                vec![reference::cross_entropy(&logits, v, &t2, &w2)]
            }, seed).unwrap();
    }

    #[test]
    fn causal_attention_backward_matches_finite_differences(b in 1usize..3, t in 1usize..7, nh in 1usize..3, hs in 1usize..5, seed in 0u64..1000) {
        // T and hs off any tile size; the scale of GPT-2, 1/√hs.
        let scale = (hs as f32).powf(-0.5);
        check("causal_attention", &[vec![b, t, 3 * nh * hs]],
            &move |tp, v| tp.causal_attention(&v[0], nh, scale),
            &move |x| reference::attention(&x[0], b, t, nh, scale as f64).0, seed).unwrap();
    }

    #[test]
    fn head_permutes_backward_match_finite_differences(b in 1usize..3, t in dims(), nh in 1usize..3, hs in 1usize..4, seed in 0u64..1000) {
        let c = nh * hs;
        let w = 3 * c;
        // split the middle third (the "k" columns of a fused qkv) into heads
        check("split_heads", &[vec![b, t, w]], &move |tp, v| tp.split_heads(&v[0], nh, c, c),
            &move |x| {
                let mut out = Vec::new();
                for bi in 0..b { for h in 0..nh { for ti in 0..t { for d in 0..hs {
                    out.push(x[0][(bi * t + ti) * w + c + h * hs + d]);
                }}}}
                out
            }, seed).unwrap();
        check("merge_heads", &[vec![b, nh, t, hs]], &|tp, v| tp.merge_heads(&v[0]),
            &move |x| {
                let mut out = Vec::new();
                for bi in 0..b { for ti in 0..t { for h in 0..nh { for d in 0..hs {
                    out.push(x[0][((bi * nh + h) * t + ti) * hs + d]);
                }}}}
                out
            }, seed).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn slice_backward_matches_finite_differences(r in dims(), c in 3usize..9, seed in 0u64..1000) {
        // columns [1, c-1) of (r, c); then the same range added into a (r, c) base
        let w = c - 2;
        check("slice_axis", &[vec![r, c]], &move |t, v| t.slice_axis(&v[0], 1, 1, w),
            &move |x| x[0].chunks(c).flat_map(|row| row[1..c - 1].to_vec()).collect(), seed).unwrap();
        check("add_into_axis", &[vec![r, c], vec![r, w]], &move |t, v| t.add_into_axis(&v[0], 1, 1, &v[1]),
            &move |x| {
                let mut out = x[0].clone();
                for i in 0..r { for j in 0..w { out[i * c + 1 + j] += x[1][i * w + j]; } }
                out
            }, seed).unwrap();
    }
}

/// f64 reference of `lora_into`: y (rows, wide) with s·(x·Aᵀ)·Bᵀ added at columns col0..col0+w;
/// x (rows, n_in), A (r, n_in), B (w, r).
fn lora_into64(
    y: &[f64],
    x: &[f64],
    a: &[f64],
    b: &[f64],
    [n_in, r, w, wide, col0]: [usize; 5],
    s: f64,
) -> Vec<f64> {
    let mut out = y.to_vec();
    for (i, xr) in x.chunks(n_in).enumerate() {
        let h: Vec<f64> = a
            .chunks(n_in)
            .map(|ar| s * xr.iter().zip(ar).map(|(p, q)| p * q).sum::<f64>())
            .collect();
        for j in 0..w {
            out[i * wide + col0 + j] += (0..r).map(|q| h[q] * b[j * r + q]).sum::<f64>();
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn lora_into_backward_matches_finite_differences(t in 1usize..4, n_in in 1usize..5, r in 1usize..3,
                                                     w in 1usize..4, extra in 0usize..4, seed in 0u64..1000) {
        // x: (2, t, in); y = 1.5·y0 (a fresh tensor: written in place) or y0 itself (shared with
        // its parameter: copied first), the update in columns [col0, col0 + w) of (2, t, wide).
        let (wide, col0, s) = (w + extra, extra / 2, 0.7);
        let shapes = [vec![2, t, wide], vec![2, t, n_in], vec![r, n_in], vec![w, r]];
        let dims = [n_in, r, w, wide, col0];
        check("lora_into", &shapes,
            &move |tp, v| tp.lora_into(tp.scale(&v[0], 1.5)?, &v[1], &v[2], &v[3], s, col0),
            &move |x| {
                let y: Vec<f64> = x[0].iter().map(|v| 1.5 * v).collect();
                lora_into64(&y, &x[1], &x[2], &x[3], dims, s as f64)
            }, seed).unwrap();
        check("lora_into shared y", &shapes,
            &move |tp, v| tp.lora_into(v[0].clone(), &v[1], &v[2], &v[3], s, col0),
            &move |x| lora_into64(&x[0], &x[1], &x[2], &x[3], dims, s as f64), seed).unwrap();
    }
}

/// The column blocks of g parts of width w: z·(w + gap), plus z² when `ragged` (irregular
/// steps); with `shared`, part 1 adds into part 0's block.
fn group_col0s(g: usize, w: usize, gap: usize, ragged: bool, shared: bool) -> Vec<usize> {
    (0..g)
        .map(|z| match z {
            1 if shared => 0,
            _ => z * (w + gap) + if ragged { z * z } else { 0 },
        })
        .collect()
}

/// `lora_group`'s parts from inputs `[y, x, A_1, B_1, A_2, B_2, …]` and their blocks.
fn group_parts<'a>(v: &'a [Var], col0s: &[usize]) -> Vec<(&'a Var, &'a Var, usize)> {
    col0s
        .iter()
        .enumerate()
        .map(|(z, &c)| (&v[2 + 2 * z], &v[3 + 2 * z], c))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn lora_group_backward_matches_finite_differences(t in 1usize..3, n_in in 1usize..5, r in 1usize..3,
                                                      w in 1usize..4, g in 2usize..4, gap in 0usize..3,
                                                      ragged: bool, shared: bool, seed in 0u64..1000) {
        // x: (2, t, in); y (2, t, wide) fresh (1.5·y0) or shared (y0); g parts with A_z (r, in),
        // B_z (w, r) adding into the blocks at col0_z: regular, ragged, or two on one block.
        let col0s = group_col0s(g, w, gap, ragged, shared);
        let wide = col0s.iter().max().unwrap() + w + 1;
        let mut shapes = vec![vec![2, t, wide], vec![2, t, n_in]];
        for _ in 0..g {
            shapes.extend([vec![r, n_in], vec![w, r]]);
        }
        let s = 0.7;
        let c0 = col0s.clone();
        let reference = move |y: Vec<f64>, x: &[Vec<f64>]| {
            c0.iter().enumerate().fold(y, |u, (z, &c)| {
                lora_into64(&u, &x[1], &x[2 + 2 * z], &x[3 + 2 * z], [n_in, r, w, wide, c], s as f64)
            })
        };
        let (r1, c1) = (reference.clone(), col0s.clone());
        check("lora_group", &shapes,
            &move |tp, v| tp.lora_group(tp.scale(&v[0], 1.5)?, &v[1], &group_parts(v, &c1), s),
            &move |x| r1(x[0].iter().map(|v| 1.5 * v).collect(), x), seed).unwrap();
        check("lora_group shared y", &shapes,
            &move |tp, v| tp.lora_group(v[0].clone(), &v[1], &group_parts(v, &col0s), s),
            &move |x| reference(x[0].clone(), x), seed).unwrap();
    }

    /// x's gradient summed in place: the residual's share is pending when the group's rule
    /// runs, and the parts' dp_z·A_z are added into it.
    #[test]
    fn lora_group_adds_into_a_pending_gradient(rows in 1usize..4, c in 2usize..5, r in 1usize..3, seed in 0u64..1000) {
        let shapes = [vec![rows, 3 * c], vec![rows, c], vec![r, c], vec![c, r], vec![r, c], vec![c, r]];
        let s = 0.7;
        check("lora_group + x", &shapes,
            &move |tp, v| {
                let u = tp.lora_group(tp.scale(&v[0], 1.0)?, &v[1], &[(&v[2], &v[3], 0), (&v[4], &v[5], 2 * c)], s)?;
                let back = tp.slice_axis(&u, 1, c, c)?; // the untouched middle block
                // scale's rule makes a fresh (exclusive) gradient for x: one that can be taken.
                tp.add(&tp.add(&back, &tp.scale(&v[1], 2.0)?)?, &tp.slice_axis(&u, 1, 0, c)?)
            },
            &move |x| {
                let u = lora_into64(&x[0], &x[1], &x[2], &x[3], [c, r, c, 3 * c, 0], s as f64);
                let u = lora_into64(&u, &x[1], &x[4], &x[5], [c, r, c, 3 * c, 2 * c], s as f64);
                (0..rows * c).map(|e| {
                    let (i, j) = (e / c, e % c);
                    u[i * 3 * c + c + j] + 2.0 * x[1][e] + u[i * 3 * c + j]
                }).collect()
            }, seed).unwrap();
    }
}

#[test]
fn lora_group_of_different_ranks_runs_part_by_part() {
    // r = 1 and r = 2: not one group; the same numbers as two lora_into.
    let (t, n_in, w) = (3, 4, 2);
    let shapes = [
        vec![t, 2 * w],
        vec![t, n_in],
        vec![1, n_in],
        vec![w, 1],
        vec![2, n_in],
        vec![w, 2],
    ];
    let s = 0.5;
    check(
        "lora_group mixed r",
        &shapes,
        &move |tp, v| {
            tp.lora_group(
                tp.scale(&v[0], 1.0)?,
                &v[1],
                &[(&v[2], &v[3], 0), (&v[4], &v[5], w)],
                s,
            )
        },
        &move |x| {
            let u = lora_into64(&x[0], &x[1], &x[2], &x[3], [n_in, 1, w, 2 * w, 0], s as f64);
            lora_into64(&u, &x[1], &x[4], &x[5], [n_in, 2, w, 2 * w, w], s as f64)
        },
        5,
    )
    .unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    /// A value read by several ops gets the sum of their gradients, whether the tape adds them or
    /// the later rules add theirs in place (`Pending::take`): a residual block
    /// out = x + (LN(x)·W + two LoRA updates of LN(x)), where x's gradient is the residual's
    /// plus layer norm's (added by the layer-norm kernel) and LN(x)'s is the base product's plus
    /// both adapters' (added by their products).
    #[test]
    fn gradients_summed_in_place_match_finite_differences(rows in 1usize..5, c in 2usize..6, r in 1usize..3, seed in 0u64..1000) {
        let shapes = [vec![rows, c], vec![c], vec![c], vec![c, c], vec![r, c], vec![c, r], vec![r, c], vec![c, r]];
        let s = 0.7;
        check("residual block", &shapes,
            &move |tp, v| {
                let h = tp.layernorm(&v[0], &v[1], &v[2], 1e-5)?;
                let u = tp.matmul(&h, &v[3], None, MatmulOpts::default())?;
                let u = tp.lora_into(u, &h, &v[4], &v[5], s, 0)?;
                let u = tp.lora_into(u, &h, &v[6], &v[7], s, 0)?;
                tp.add(&v[0], &u)
            },
            &move |x| {
                let h = reference::layernorm(&x[0], &x[1], &x[2], 1e-5);
                let u = reference::matmul(&h, &x[3], None, [1, rows, c, c], MatmulOpts::default());
                let u = lora_into64(&u, &h, &x[4], &x[5], [c, r, c, c, 0], s as f64);
                let u = lora_into64(&u, &h, &x[6], &x[7], [c, r, c, c, 0], s as f64);
                x[0].iter().zip(&u).map(|(a, b)| a + b).collect()
            }, seed).unwrap();
    }
}

/// The three ways to build `y = gelu(x·W1 + b1)·op(W2) + b2`: both products fused with GELU,
/// the forward fused only (g a value of the graph), the backward fused only (u from a plain
/// product, GELU's forward kernel).
#[derive(Clone, Copy, Debug)]
enum GeluMlp {
    Fused,
    ForwardFused,
    BackwardFused,
}

fn gelu_mlp(tp: &Tape, v: &[Var], how: GeluMlp, tb: bool) -> tensor::Result<Var> {
    let o1 = MatmulOpts::default();
    let o2 = MatmulOpts {
        trans_a: false,
        trans_b: tb,
    };
    match how {
        GeluMlp::Fused => {
            let pre = tp.linear_gelu(&v[0], &v[1], Some(&v[2]), o1)?;
            tp.gelu_linear(pre, &v[3], Some(&v[4]), o2)
        }
        GeluMlp::ForwardFused => {
            let g = tp.gelu_value(tp.linear_gelu(&v[0], &v[1], Some(&v[2]), o1)?)?;
            tp.matmul(&g, &v[3], Some(&v[4]), o2)
        }
        GeluMlp::BackwardFused => {
            let u = tp.matmul(&v[0], &v[1], Some(&v[2]), o1)?;
            tp.gelu_linear(tp.gelu_out(u)?, &v[3], Some(&v[4]), o2)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]

    #[test]
    fn gelu_linear_backward_matches_finite_differences(b in 1usize..3, t in dims(), c in dims(),
                                                       f in dims(), tb: bool, seed in 0u64..1000) {
        // x (b, t, c), W1 (c, f), b1 (f), W2 (f, c) or (c, f) with tb, b2 (c).
        let w2 = if tb { vec![c, f] } else { vec![f, c] };
        let shapes = [vec![b, t, c], vec![c, f], vec![f], w2, vec![c]];
        let o2 = MatmulOpts { trans_a: false, trans_b: tb };
        let rows = b * t;
        let reference = move |x: &[Vec<f64>]| {
            let u = reference::matmul(&x[0], &x[1], Some(&x[2]), [1, rows, c, f], MatmulOpts::default());
            let g = reference::gelu(&u);
            reference::matmul(&g, &x[3], Some(&x[4]), [1, rows, f, c], o2)
        };
        for how in [GeluMlp::Fused, GeluMlp::ForwardFused, GeluMlp::BackwardFused] {
            check(&format!("gelu mlp {how:?}"), &shapes, &move |tp, v| gelu_mlp(tp, v, how, tb),
                &reference, seed).unwrap();
        }
    }
}

#[test]
fn dropout_backward_matches_finite_differences() {
    // The mask is a function of (seed, index): read it off by dropping out a tensor of ones.
    let cpu = Device::cpu();
    let (p, seed) = (0.3, 42);
    let ones = Tensor::full(&[5, 6], 1.0, &cpu).unwrap();
    let mask: Vec<f64> = tensor::ops::dropout::dropout(&ones, p, seed)
        .unwrap()
        .to_vec()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    check(
        "dropout",
        &[vec![5, 6]],
        &move |t, v| t.dropout(&v[0], p, seed),
        &move |x| x[0].iter().zip(&mask).map(|(a, m)| a * m).collect(),
        3,
    )
    .unwrap();
}

#[test]
fn a_wrong_backward_is_rejected() {
    // GELU whose backward forgets the cubic term's derivative: the checker must say no.
    let wrong: &Build = &|t, v| {
        let x = v[0].value.clone();
        let y = tensor::ops::gelu::gelu(&x)?;
        t.record("wrong_gelu", y, &[&v[0]], x.bytes(), move |dy| {
            let k = (2.0f32 / std::f32::consts::PI).sqrt();
            let xs = x.to_vec()?;
            let d: Vec<f32> = xs
                .iter()
                .map(|&a| {
                    let th = (k * (a + 0.044715 * a * a * a)).tanh();
                    0.5 * (1.0 + th) + 0.5 * a * (1.0 - th * th) * k // missing (1 + 3·0.044715·x²)
                })
                .collect();
            let dg = Tensor::from_vec(d, x.shape(), &x.device())?;
            Ok(vec![Some(tensor::ops::elementwise::mul(dy, &dg)?)])
        })
    };
    let err = check(
        "wrong gelu",
        &[vec![4, 5]],
        wrong,
        &|x| reference::gelu(&x[0]),
        1,
    )
    .expect_err("a wrong backward passed the finite-difference check");
    assert!(err.contains("finite difference"), "{err}");
    // and the right rule passes on the same inputs
    check(
        "gelu",
        &[vec![4, 5]],
        &|t, v| t.gelu(&v[0]),
        &|x| reference::gelu(&x[0]),
        1,
    )
    .unwrap();
}
