//! Every backward rule on the GPU equals the same rule on the CPU backend, and a small MLP
//! learns on both devices.

use autograd::{AdamW, Grads, Param, ParamGroup, Tape, Var};
use proptest::prelude::*;
use tensor::ops::matmul::MatmulOpts;
use tensor::testing::{assert_close_slices, gpu, random_vec};
use tensor::{Device, Tensor};

type Build = dyn Fn(&Tape, &[Var]) -> tensor::Result<Var>;

/// Gradients of loss = Σ r ⊙ build(inputs) for every input, on `device`.
fn grads_on(device: &Device, shapes: &[Vec<usize>], build: &Build, seed: u64) -> Vec<Vec<f32>> {
    let params: Vec<Param> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let v = random_vec(s.iter().product(), seed + i as u64);
            Param::trainable("x", Tensor::from_vec(v, s, device).unwrap())
        })
        .collect();
    let tape = Tape::new();
    let vars: Vec<Var> = params.iter().map(|p| tape.param(p)).collect();
    let y = build(&tape, &vars).unwrap();
    let r = Tensor::from_vec(random_vec(y.value.numel(), seed + 100), y.shape(), device).unwrap();
    let loss = tape
        .sum_all(&tape.mul(&y, &tape.constant(r)).unwrap())
        .unwrap();
    let mut grads = Grads::new();
    tape.backward(&loss, &mut grads).unwrap();
    params
        .iter()
        .map(|p| match grads.get(p.as_trainable().unwrap().id) {
            Some(g) => g.to_vec().unwrap(),
            None => vec![0.0; p.value().numel()],
        })
        .collect()
}

fn same_on_gpu(name: &str, shapes: &[Vec<usize>], build: &Build, seed: u64) {
    let Some(g) = gpu() else { return };
    let want = grads_on(&Device::cpu(), shapes, build, seed);
    let got = grads_on(&g, shapes, build, seed);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        // f32 on both; sums may be ordered differently: 1e-4 absolute + 1e-4 relative.
        assert_close_slices(&format!("{name} d(input {i})"), g, w, 1e-4, 1e-4);
    }
}

fn dims() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(7), Just(17), 2usize..12]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    #[test]
    fn every_backward_rule_matches_cpu(b in 1usize..3, t in dims(), c in dims(), seed in 0u64..1000) {
        let n = 5;
        let opts = MatmulOpts::default();
        same_on_gpu("matmul", &[vec![b, t, c], vec![c, n], vec![n]], &move |tp, v| tp.matmul(&v[0], &v[1], Some(&v[2]), opts), seed);
        same_on_gpu("matmul_tt", &[vec![c, t], vec![n, c]], &|tp, v| tp.matmul(&v[0], &v[1], None, MatmulOpts { trans_a: true, trans_b: true }), seed);
        same_on_gpu("add", &[vec![t, c], vec![t, c]], &|tp, v| tp.add(&v[0], &v[1]), seed);
        same_on_gpu("mul", &[vec![t, c], vec![t, c]], &|tp, v| tp.mul(&v[0], &v[1]), seed);
        same_on_gpu("scale", &[vec![t, c]], &|tp, v| tp.scale(&v[0], 0.3), seed);
        same_on_gpu("add_bias", &[vec![b, t, c], vec![c]], &|tp, v| tp.add_bias(&v[0], &v[1]), seed);
        same_on_gpu("gelu", &[vec![t, c]], &|tp, v| tp.gelu(&v[0]), seed);
        same_on_gpu("softmax", &[vec![b, t, t.max(c)]], &|tp, v| tp.softmax(&v[0], true), seed);
        same_on_gpu("layernorm", &[vec![t, c], vec![c], vec![c]], &|tp, v| tp.layernorm(&v[0], &v[1], &v[2], 1e-5), seed);
        let ids: Vec<u32> = (0..t).map(|i| ((i * 5 + seed as usize) % c) as u32).collect();
        same_on_gpu("embedding", &[vec![c, 3]], &move |tp, v| tp.embedding(&v[0], &ids), seed);
        let targets: Vec<u32> = (0..t).map(|i| ((i * 3 + 1) % c) as u32).collect();
        let weights: Vec<f32> = (0..t).map(|i| if i % 2 == 0 { 1.0 } else { 0.5 }).collect();
        let (t2, w2) = (targets.clone(), weights.clone());
        same_on_gpu("cross_entropy", &[vec![t, c]], &move |tp, v| tp.cross_entropy(&v[0], &targets, &weights), seed);
        same_on_gpu("linear_cross_entropy", &[vec![t, 5], vec![c, 5]], &move |tp, v| tp.linear_cross_entropy(&v[0], &v[1], &t2, &w2), seed);
        same_on_gpu("causal_attention", &[vec![b, t, 3 * 2 * 3]], &|tp, v| tp.causal_attention(&v[0], 2, 0.6), seed);
        same_on_gpu("split_heads", &[vec![b, t, 6]], &|tp, v| tp.split_heads(&v[0], 2, 2, 4), seed);
        same_on_gpu("merge_heads", &[vec![b, 2, t, 3]], &|tp, v| tp.merge_heads(&v[0]), seed);
        same_on_gpu("dropout", &[vec![t, c]], &|tp, v| tp.dropout(&v[0], 0.25, 9), seed);
        same_on_gpu("slice_axis", &[vec![b, t, c + 2]], &move |tp, v| tp.slice_axis(&v[0], 2, 1, c), seed);
        same_on_gpu("add_into_axis", &[vec![t, c + 3], vec![t, c]], &move |tp, v| tp.add_into_axis(&v[0], 1, 2, &v[1]), seed);
        // In place (y a fresh output) and copied (y shared with its parameter), x 3-D.
        same_on_gpu("lora_into", &[vec![b, t, c + 3], vec![b, t, 5], vec![2, 5], vec![c, 2]],
            &|tp, v| tp.lora_into(tp.scale(&v[0], 1.5)?, &v[1], &v[2], &v[3], 0.7, 2), seed);
        same_on_gpu("lora_into shared y", &[vec![t, c], vec![t, 5], vec![3, 5], vec![c, 3]],
            &|tp, v| tp.lora_into(v[0].clone(), &v[1], &v[2], &v[3], 2.0, 0), seed);
        // q's and v's updates of one output, each parameter in its own buffer.
        same_on_gpu("lora_group", &[vec![b, t, 3 * c], vec![b, t, 5], vec![2, 5], vec![c, 2], vec![2, 5], vec![c, 2]],
            &move |tp, v| tp.lora_group(tp.scale(&v[0], 1.5)?, &v[1], &[(&v[2], &v[3], 0), (&v[4], &v[5], 2 * c)], 0.7), seed);
        same_on_gpu("mean_all", &[vec![t, c]], &|tp, v| tp.mean_all(&v[0]), seed);
        // GELU between two products, fused into both (x, W1, b1, W2ᵀ stored (c, 7), b2).
        same_on_gpu("linear_gelu + gelu_linear", &[vec![b, t, c], vec![c, 7], vec![7], vec![c, 7], vec![c]],
            &move |tp, v| {
                let pre = tp.linear_gelu(&v[0], &v[1], Some(&v[2]), opts)?;
                tp.gelu_linear(pre, &v[3], Some(&v[4]), MatmulOpts { trans_a: false, trans_b: true })
            }, seed);
        // Gradients summed in place: x's by the layer-norm kernel, LN(x)'s by the products.
        same_on_gpu("residual block", &[vec![b, t, c], vec![c], vec![c], vec![c, c], vec![2, c], vec![c, 2]],
            &move |tp, v| {
                let h = tp.layernorm(&v[0], &v[1], &v[2], 1e-5)?;
                let u = tp.matmul(&h, &v[3], None, opts)?;
                let u = tp.lora_into(u, &h, &v[4], &v[5], 0.7, 0)?;
                tp.add(&v[0], &u)
            }, seed);
    }
}

/// `lora_group` of q and v (c_attn's layout: y (rows, 3C), blocks at 0 and 2C) on `device`:
/// every gradient, and the kernel dispatches of forward and backward. With `packed` (a GPU),
/// A_q, B_q, A_v, B_v are views of one buffer in that order, `gap` elements apart, as in
/// AdamW's parameter arena: the A's, and the B's, are one step apart.
fn lora_group_grads(device: &Device, packed: bool, seed: u64) -> (Vec<Vec<f32>>, u64) {
    let (rows, c, n_in, r, gap) = (24, 12, 12, 4, 20);
    let shapes = [
        vec![rows, 3 * c],
        vec![rows, n_in],
        vec![r, n_in],
        vec![c, r],
        vec![r, n_in],
        vec![c, r],
    ];
    let values: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| random_vec(s.iter().product(), seed + i as u64))
        .collect();
    let tensors: Vec<Tensor> = if packed {
        let mut flat = Vec::new();
        let mut offsets = Vec::new();
        for v in &values[2..] {
            offsets.push(flat.len());
            flat.extend(v);
            flat.extend(std::iter::repeat_n(0.0, gap));
        }
        let root = Tensor::from_vec(flat.clone(), &[flat.len()], device).unwrap();
        let mut ts: Vec<Tensor> = values[..2]
            .iter()
            .zip(&shapes)
            .map(|(v, s)| Tensor::from_vec(v.clone(), s, device).unwrap())
            .collect();
        ts.extend(
            offsets
                .iter()
                .zip(&shapes[2..])
                .map(|(&o, s)| root.view(o, s).unwrap()),
        );
        ts
    } else {
        values
            .iter()
            .zip(&shapes)
            .map(|(v, s)| Tensor::from_vec(v.clone(), s, device).unwrap())
            .collect()
    };
    let params: Vec<Param> = tensors
        .into_iter()
        .map(|t| Param::trainable("p", t))
        .collect();
    let r_out =
        Tensor::from_vec(random_vec(rows * 3 * c, seed + 100), &[rows, 3 * c], device).unwrap();
    let dispatches = || match device {
        Device::Gpu(ctx) => ctx.dispatch_count(),
        Device::Cpu(_) => 0,
    };
    let tape = Tape::new();
    let v: Vec<Var> = params.iter().map(|p| tape.param(p)).collect();
    let y = tape.scale(&v[0], 1.5).unwrap();
    let before = dispatches();
    let out = tape
        .lora_group(y, &v[1], &[(&v[2], &v[3], 0), (&v[4], &v[5], 2 * c)], 0.7)
        .unwrap();
    let forward = dispatches() - before;
    let loss = tape
        .sum_all(&tape.mul(&out, &tape.constant(r_out)).unwrap())
        .unwrap();
    let mut grads = Grads::new();
    // The group's rule runs first in backward, after the loss's two: count it alone.
    let before = dispatches();
    tape.backward(&loss, &mut grads).unwrap();
    let backward = dispatches() - before;
    let g = params
        .iter()
        .map(|p| {
            grads
                .get(p.as_trainable().unwrap().id)
                .unwrap()
                .to_vec()
                .unwrap()
        })
        .collect();
    (g, forward + backward)
}

#[test]
fn lora_group_matches_cpu_in_one_buffer_and_in_separate_ones() {
    let Some(_) = gpu() else { return };
    // A context of its own: its dispatch count is this test's alone.
    let g = tensor::testing::gpu_with_binding_limit(u64::MAX);
    let (want, _) = lora_group_grads(&Device::cpu(), false, 3);
    let (separate, n_separate) = lora_group_grads(&g, false, 3);
    let (packed, n_packed) = lora_group_grads(&g, true, 3);
    for (i, w) in want.iter().enumerate() {
        assert_close_slices(
            &format!("separate d(input {i})"),
            &separate[i],
            w,
            1e-4,
            1e-4,
        );
        assert_close_slices(&format!("packed d(input {i})"), &packed[i], w, 1e-4, 1e-4);
    }
    // Six grouped calls, seven dispatches with the parameters in one buffer (dx's sum takes
    // two); in separate buffers the three products reading a parameter (h, Δy, dp) take one
    // per part: ten. Everything else is the same.
    assert_eq!(
        n_separate - n_packed,
        3,
        "{n_separate} dispatches, {n_packed} packed"
    );
}

/// A two-layer MLP (2 → 16 → 2, GELU) learns XOR-like quadrants with AdamW.
fn mlp_learns(device: &Device) -> f32 {
    let xs: Vec<f32> = (0..64)
        .flat_map(|i| {
            let a = ((i * 37 % 64) as f32 / 32.0) - 1.0;
            let b = ((i * 11 % 64) as f32 / 32.0) - 1.0;
            [a, b]
        })
        .collect();
    let targets: Vec<u32> = xs
        .chunks(2)
        .map(|p| u32::from((p[0] > 0.0) != (p[1] > 0.0)))
        .collect();
    let x = Tensor::from_vec(xs, &[64, 2], device).unwrap();
    let w1 = Param::trainable(
        "w1",
        Tensor::from_vec(
            random_vec(32, 1).iter().map(|v| v * 1.5).collect(),
            &[2, 16],
            device,
        )
        .unwrap(),
    );
    let b1 = Param::trainable("b1", Tensor::zeros(&[16], device).unwrap());
    let w2 = Param::trainable(
        "w2",
        Tensor::from_vec(
            random_vec(32, 2).iter().map(|v| v * 0.5).collect(),
            &[16, 2],
            device,
        )
        .unwrap(),
    );
    let b2 = Param::trainable("b2", Tensor::zeros(&[2], device).unwrap());
    let params = [w1, b1, w2, b2];
    let mut opt = AdamW::new(vec![ParamGroup::new(
        params
            .iter()
            .map(|p| p.as_trainable().unwrap().clone())
            .collect(),
        0.0,
    )]);
    let weights = vec![1.0; 64];
    let mut loss_value = f32::NAN;
    for _ in 0..300 {
        let tape = Tape::new();
        let v: Vec<Var> = params.iter().map(|p| tape.param(p)).collect();
        let xv = tape.constant(x.clone());
        let h = tape
            .gelu(
                &tape
                    .matmul(&xv, &v[0], Some(&v[1]), MatmulOpts::default())
                    .unwrap(),
            )
            .unwrap();
        let logits = tape
            .matmul(&h, &v[2], Some(&v[3]), MatmulOpts::default())
            .unwrap();
        let loss = tape.cross_entropy(&logits, &targets, &weights).unwrap();
        let mut grads = Grads::new();
        tape.backward(&loss, &mut grads).unwrap();
        opt.step(&grads, 0.05).unwrap();
        loss_value = loss.value.to_vec().unwrap()[0];
    }
    loss_value
}

fn mlp_reaches_a_low_loss(device: &Device) {
    let loss = mlp_learns(device);
    assert!(loss < 0.1, "final loss {loss} (chance is ln 2 = 0.693)");
}

tensor::on_devices!(mlp_reaches_a_low_loss, mlp_learns_on_cpu, mlp_learns_on_gpu);
