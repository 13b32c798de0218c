//! LoRA's promise, measured: for y = x·W0 + s·(x·A)·B with W0 frozen, the gradient store holds
//! exactly A and B, optimizer state is exactly 2·(|A|+|B|)·4 bytes, W0 is bitwise unchanged, no
//! W0-sized gradient is ever allocated, and backward launches one matmul fewer than with W0
//! trainable. The same graph with W0 trainable shows all of those costs.

use autograd::{AdamW, Grads, MemoryReport, Param, ParamGroup, Tape, memory::parameter_bytes};
use tensor::ops::matmul::MatmulOpts;
use tensor::testing::random;
use tensor::{Device, Tensor};

const N: usize = 16; // rows of x
const K: usize = 32; // in features
const M: usize = 24; // out features
const R: usize = 4; // LoRA rank

struct Run {
    grads_held: usize,
    grad_bytes_peak: u64,
    optimizer_bytes: u64,
    matmuls_in_backward: u64,
    w0_changed: bool,
    report: MemoryReport,
}

fn run(device: &Device, w0_trainable: bool) -> Run {
    let x = random(&[N, K], 1, device);
    let w0 = random(&[K, M], 2, device);
    let w0_before = w0.to_vec().unwrap();
    let params = [
        if w0_trainable {
            Param::trainable("w0", w0.copy().unwrap())
        } else {
            Param::frozen("w0", w0.copy().unwrap())
        },
        Param::trainable("A", random(&[K, R], 3, device)),
        // B is zero at LoRA's init; random here so that A gets a non-zero gradient.
        Param::trainable("B", random(&[R, M], 4, device)),
    ];
    let tape = Tape::new();
    let (w, a, b) = (
        tape.param(&params[0]),
        tape.param(&params[1]),
        tape.param(&params[2]),
    );
    let xv = tape.constant(x);
    let base = tape.matmul(&xv, &w, None, MatmulOpts::default()).unwrap();
    let xa = tape.matmul(&xv, &a, None, MatmulOpts::default()).unwrap();
    let xab = tape.matmul(&xa, &b, None, MatmulOpts::default()).unwrap();
    let y = tape.add(&base, &tape.scale(&xab, 2.0).unwrap()).unwrap();
    let loss = tape.mean_all(&tape.mul(&y, &y).unwrap()).unwrap();
    let activations = tape.saved_memory();
    let mut grads = Grads::new();
    let stats = tape.backward(&loss, &mut grads).unwrap();
    let trainables: Vec<_> = params
        .iter()
        .filter_map(|p| p.as_trainable().cloned())
        .collect();
    let mut opt = AdamW::new(vec![ParamGroup::new(trainables, 0.01)]);
    opt.step(&grads, 1e-3).unwrap();
    let report = MemoryReport {
        parameters: parameter_bytes(&params),
        gradients: grads.memory(),
        optimizer: opt.memory(),
        activations,
    };
    Run {
        grads_held: grads.len(),
        grad_bytes_peak: grads.memory().peak,
        optimizer_bytes: opt.memory().live,
        matmuls_in_backward: stats.matmuls,
        w0_changed: params[0].value().to_vec().unwrap() != w0_before,
        report,
    }
}

fn check(device: &Device) {
    let lora_bytes = ((K * R + R * M) * 4) as u64;
    let w0_bytes = (K * M * 4) as u64;
    let frozen = run(device, false);
    let full = run(device, true);
    println!("{device:?}, W0 frozen:\n{}", frozen.report);
    println!("{device:?}, W0 trainable:\n{}", full.report);

    assert_eq!(frozen.grads_held, 2, "only A and B hold gradients");
    assert_eq!(
        frozen.grad_bytes_peak, lora_bytes,
        "no W0-sized gradient was ever allocated"
    );
    assert_eq!(
        frozen.optimizer_bytes,
        2 * lora_bytes,
        "AdamW keeps m and v for A and B only"
    );
    assert!(
        !frozen.w0_changed,
        "a frozen W0 must stay bitwise unchanged"
    );

    assert_eq!(full.grads_held, 3);
    assert_eq!(full.grad_bytes_peak, lora_bytes + w0_bytes);
    assert_eq!(full.optimizer_bytes, 2 * (lora_bytes + w0_bytes));
    assert!(full.w0_changed);

    assert_eq!(
        full.matmuls_in_backward,
        frozen.matmuls_in_backward + 1,
        "one matmul fewer per frozen weight"
    );
    // x is saved only for dW0 (and dA); with W0 frozen, its copy for dW0 is not kept.
    assert!(frozen.report.activations.peak < full.report.activations.peak);
}

tensor::on_devices!(
    check,
    frozen_weight_has_no_footprint_cpu,
    frozen_weight_has_no_footprint_gpu
);

#[test]
fn inference_tape_records_nothing() {
    let cpu = Device::cpu();
    let w = Param::trainable("w", Tensor::full(&[3, 3], 0.5, &cpu).unwrap());
    let tape = Tape::inference();
    let x = tape.constant(Tensor::full(&[2, 3], 1.0, &cpu).unwrap());
    let y = tape
        .matmul(&x, &tape.param(&w), None, MatmulOpts::default())
        .unwrap();
    assert!(tape.is_empty() && !y.requires_grad);
    assert_eq!(tape.saved_memory().peak, 0);
}

#[test]
fn saved_tensors_are_released_by_backward() {
    let cpu = Device::cpu();
    let w = Param::trainable("w", random(&[4, 4], 1, &cpu));
    let tape = Tape::new();
    let x = tape.constant(random(&[3, 4], 2, &cpu));
    let h = tape
        .gelu(
            &tape
                .matmul(&x, &tape.param(&w), None, MatmulOpts::default())
                .unwrap(),
        )
        .unwrap();
    let loss = tape.sum_all(&h).unwrap();
    assert!(tape.saved_memory().live > 0);
    tape.backward(&loss, &mut Grads::new()).unwrap();
    assert_eq!(tape.saved_memory().live, 0);
    assert!(tape.is_empty());
}

#[test]
fn a_value_used_twice_gets_both_contributions() {
    // y = x² + 5x + 4 at x = 3: dy/dx = 2x + 5 = 11 (candle's sanity check).
    let cpu = Device::cpu();
    let p = Param::trainable("x", Tensor::from_vec(vec![3.0], &[1], &cpu).unwrap());
    let tape = Tape::new();
    let x = tape.param(&p);
    let four = tape.constant(Tensor::from_vec(vec![4.0], &[1], &cpu).unwrap());
    let y = tape
        .add(
            &tape
                .add(&tape.mul(&x, &x).unwrap(), &tape.scale(&x, 5.0).unwrap())
                .unwrap(),
            &four,
        )
        .unwrap();
    assert_eq!(y.value.to_vec().unwrap(), vec![28.0]);
    let mut grads = Grads::new();
    tape.backward(&y, &mut grads).unwrap();
    assert_eq!(
        grads
            .get(p.as_trainable().unwrap().id)
            .unwrap()
            .to_vec()
            .unwrap(),
        vec![11.0]
    );
    // a second backward over a new tape accumulates (gradient accumulation over micro-batches)
    let tape = Tape::new();
    let x = tape.param(&p);
    let y = tape.mul(&x, &x).unwrap();
    tape.backward(&y, &mut grads).unwrap();
    assert_eq!(
        grads
            .get(p.as_trainable().unwrap().id)
            .unwrap()
            .to_vec()
            .unwrap(),
        vec![17.0]
    );
}
