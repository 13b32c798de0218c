//! Devices that say no: each way a device can refuse a request ends in an `Err` that says what
//! was asked and what is available, never in a panic, an abort or a hang.
//!
//! Covered here through the public API: no adapter on the backends asked for; an adapter
//! without the limits or features asked for; a tensor larger than `max_buffer_size` (as a model
//! too large for the limits requested would need); a destroyed (lost) device; absurd shapes on
//! the CPU. Validation errors inside a batch of dispatches need the crate's internals and are
//! tested next to the code that handles them, in `src/gpu/errors.rs`.

use std::sync::mpsc;
use std::time::Duration;

use tensor::gpu::wgpu;
use tensor::ops::elementwise::add;
use tensor::{Device, DeviceChoice, Error, GpuOptions, Tensor, testing};

/// A GPU device of its own (never the shared one: some tests here break theirs on purpose).
fn own_gpu(options: GpuOptions) -> tensor::Result<Device> {
    Device::gpu_with(&GpuOptions {
        allow_software: true,
        ..options
    })
}

#[test]
fn no_adapter_on_the_backends_asked_names_them_and_lists_what_exists() {
    // No native build of wgpu has a browser WebGPU adapter, so this asks for something absent
    // on every machine.
    let err = own_gpu(GpuOptions {
        backends: Some(wgpu::Backends::BROWSER_WEBGPU),
        ..Default::default()
    })
    .unwrap_err();
    let Error::NoAdapter(msg) = &err else {
        panic!("expected NoAdapter, got {err:?}");
    };
    assert!(msg.contains("BROWSER_WEBGPU"), "{msg}");
    assert!(msg.contains("adapters on any backend: "), "{msg}");
    match testing::gpu() {
        Some(Device::Gpu(ctx)) => assert!(msg.contains(&ctx.info().name), "{msg}"),
        _ => assert!(msg.contains("adapters on any backend: none"), "{msg}"),
    }
}

#[test]
fn auto_says_why_it_fell_back_to_the_cpu() {
    let (device, note) = Device::select_explained(DeviceChoice::Auto).unwrap();
    match (&device, note) {
        (Device::Gpu(ctx), None) => assert!(!ctx.is_software(), "auto took a software GPU"),
        (Device::Cpu(_), Some(note)) => {
            assert!(note.contains("no hardware GPU"), "{note}");
            assert!(note.contains("CPU backend"), "{note}");
        }
        (device, note) => panic!("auto gave {device:?} with the note {note:?}"),
    }
}

#[test]
fn limits_and_features_beyond_the_adapter_are_listed_asked_against_available() {
    let Some(Device::Gpu(shared)) = testing::gpu() else {
        return;
    };
    let offered = shared.info().max_buffer_size;
    let asked = offered.saturating_mul(2).max(offered + 256);
    let err = own_gpu(GpuOptions {
        max_buffer_bytes: Some(asked),
        ..Default::default()
    })
    .unwrap_err();
    let Error::Unsupported { adapter, missing } = &err else {
        panic!("expected Unsupported, got {err:?}");
    };
    assert!(adapter.contains(&shared.info().name), "{adapter}");
    assert_eq!(
        missing,
        &[format!(
            "limit `max_buffer_size`: asked {asked}, the adapter offers {offered}"
        )]
    );

    // Too small for the crate's own parameter arena: said before the device is opened.
    let err = own_gpu(GpuOptions {
        max_buffer_bytes: Some(1024),
        ..Default::default()
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                available: 1024,
                ..
            }
        ),
        "{err:?}"
    );

    let err = own_gpu(GpuOptions {
        features: wgpu::Features::all(),
        ..Default::default()
    })
    .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Unsupported { .. }) && msg.contains("features not offered: "),
        "{msg}"
    );
}

#[test]
fn a_tensor_above_max_buffer_size_is_refused_and_the_device_stays_usable() {
    let Some(_) = testing::gpu() else {
        return;
    };
    let limit = 1u64 << 20;
    let device = own_gpu(GpuOptions {
        max_buffer_bytes: Some(limit),
        ..Default::default()
    })
    .unwrap();
    // Exactly at the limit is fine; one element more is not.
    let at_limit = Tensor::zeros(&[(limit / 4) as usize], &device).unwrap();
    let err = Tensor::zeros(&[(limit / 4) as usize + 1], &device).unwrap_err();
    assert_eq!(
        err,
        Error::TooLarge {
            what: "a tensor of shape [262145]".into(),
            needed: limit + 256,
            limit: "max_buffer_size",
            available: limit,
        }
    );
    let err = Tensor::from_vec(
        vec![1.0; (limit / 4) as usize + 1],
        &[(limit / 4) as usize + 1],
        &device,
    )
    .unwrap_err();
    assert!(matches!(err, Error::TooLarge { .. }), "{err:?}");
    // Nothing reached wgpu, so nothing is pending: the device computes on.
    let one = Tensor::full(&[4], 1.0, &device).unwrap();
    assert_eq!(add(&one, &one).unwrap().to_vec().unwrap(), vec![2.0; 4]);
    assert_eq!(at_limit.numel() as u64 * 4, limit);
    device.sync().unwrap();
}

#[test]
fn a_model_too_large_for_the_limits_requested_is_an_error_naming_bytes_and_limit() {
    let Some(_) = testing::gpu() else {
        return;
    };
    // GPT-2's token embedding (50257 × 768 floats) on a device asked for at most 64 MiB buffers.
    let device = own_gpu(GpuOptions {
        max_buffer_bytes: Some(64 << 20),
        ..Default::default()
    })
    .unwrap();
    let msg = Tensor::zeros(&[50257, 768], &device)
        .unwrap_err()
        .to_string();
    assert_eq!(
        msg,
        "a tensor of shape [50257, 768] needs 154389504 bytes (147.2 MiB), more than the \
         device's `max_buffer_size` of 67108864 bytes (64.0 MiB)"
    );
}

#[test]
fn absurd_gpu_shapes_are_errors() {
    let Some(device) = testing::gpu() else {
        return;
    };
    let err = Tensor::zeros(&[1 << 24, 1 << 24], &device).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { limit: "max_buffer_size", needed, .. } if needed == 1 << 50),
        "{err:?}"
    );
    let err = Tensor::zeros(&[usize::MAX, 2], &device).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
}

#[test]
fn absurd_cpu_shapes_are_errors_not_aborts() {
    let cpu = Device::cpu();
    let err = Tensor::zeros(&[usize::MAX, 2], &cpu).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "shape [{}, 2] has more elements than a usize can count",
            usize::MAX
        )
    );
    let err = Tensor::from_vec(Vec::new(), &[usize::MAX, 2], &cpu).unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    let err = Tensor::full(&[1 << 31, 1 << 31], 1.0, &cpu).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                needed: u64::MAX,
                ..
            }
        ),
        "{err:?}"
    );
    // 1 PiB: more than any address space gives, so the allocator refuses it at once.
    let err = Tensor::zeros(&[1 << 24, 1 << 24], &cpu).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::OutOfMemory { needed, .. } if needed == 1 << 50),
        "{msg}"
    );
    assert!(msg.contains("1125899906842624 bytes (1.0 PiB)"), "{msg}");
    let small = Tensor::zeros(&[2, 3], &cpu).unwrap();
    assert!(small.reshape(&[usize::MAX, 2]).is_err());
}

/// Run `f` on another thread and fail the test if it takes longer than `limit` (a hang).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("the operation hung (or panicked) instead of returning an error")
}

#[test]
fn a_lost_device_fails_every_operation_quickly() {
    let Some(_) = testing::gpu() else {
        return;
    };
    let device = own_gpu(GpuOptions::default()).unwrap();
    let Device::Gpu(ctx) = &device else {
        unreachable!()
    };
    let a = Tensor::from_vec(vec![1.0, 2.0, 3.0], &[3], &device).unwrap();
    let b = Tensor::full(&[3], 1.0, &device).unwrap();
    let pending = add(&a, &b).unwrap(); // recorded, not yet submitted
    assert!(ctx.lost_reason().is_none());
    ctx.destroy();
    assert_eq!(ctx.lost_reason().as_deref(), Some("Destroyed"));

    let results = within(Duration::from_secs(60), move || {
        let lost = |what: &str, r: tensor::Result<()>| match r {
            Err(Error::DeviceLost(why)) => why,
            other => panic!("{what}: expected DeviceLost, got {other:?}"),
        };
        vec![
            lost("zeros", Tensor::zeros(&[3], &device).map(drop)),
            lost(
                "upload",
                Tensor::from_vec(vec![1.0], &[1], &device).map(drop),
            ),
            lost("read", a.to_vec().map(drop)),
            lost("read pending", pending.to_vec().map(drop)),
            lost("op", add(&a, &b).map(drop)),
            lost("copy", a.copy().map(drop)),
            lost("sync", device.sync()),
        ]
    });
    for why in results {
        assert_eq!(why, "Destroyed");
    }
    let msg = Error::DeviceLost("Destroyed".into()).to_string();
    assert!(msg.contains("GPU device lost (Destroyed)"), "{msg}");
}
