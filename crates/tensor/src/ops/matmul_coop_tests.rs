//! Tests of the cooperative-matrix kernel: detection for adapters this machine does not have,
//! what this machine's adapter reports, and the kernel against the f64 reference where the
//! adapter runs it.

use super::*;
use crate::ops::matmul::{MatmulOpts, matmul, matmul_accumulate, matmul_gelu, matmul_scaled};
use crate::ops::matmul_f16::{F16Tensor, matmul_f16};
use crate::ops::matmul_tiled::GpuMatmul;
use crate::ops::{matmul_tiled, matmul_tune};
use crate::testing::{assert_close, gpu, random, random_vec};
use crate::{Device, Tensor};
use wgpu::CooperativeScalarType as T;

fn props(side: u32, ab: T, cr: T) -> wgpu::CooperativeMatrixProperties {
    wgpu::CooperativeMatrixProperties {
        m_size: side,
        n_size: side,
        k_size: side,
        ab_type: ab,
        cr_type: cr,
        saturating_accumulation: false,
    }
}

fn offer(backend: wgpu::Backend, extra: wgpu::Features) -> CoopOffer {
    CoopOffer {
        backend,
        features: wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            | wgpu::Features::SUBGROUP
            | extra,
        properties: vec![props(8, T::F32, T::F32)],
        subgroup_sizes: (8, 8),
    }
}

#[test]
fn detection_keeps_the_configurations_the_kernel_can_run() {
    // An adapter listing 8×8×8 f32 on Vulkan: the f32 configuration, for every product.
    let s = detect(&offer(wgpu::Backend::Vulkan, wgpu::Features::empty()));
    assert_eq!(s.usable, [CoopConfig::F32]);
    assert_eq!(s.missing, None);
    assert_eq!(s.config_for(false), Some(CoopConfig::F32));
    assert_eq!(s.config_for(true), Some(CoopConfig::F32));
    assert!(!s.features().contains(wgpu::Features::SHADER_F16));
    // NVIDIA's list: f16 16×16×16 only. An f32 product has no configuration (it is never
    // rounded to f16); a B in f16 takes the f16 one, which needs shader-f16.
    let nvidia = CoopOffer {
        properties: vec![props(16, T::F16, T::F16), props(16, T::F16, T::F32)],
        subgroup_sizes: (32, 32),
        ..offer(wgpu::Backend::Vulkan, wgpu::Features::SHADER_F16)
    };
    let s = detect(&nvidia);
    assert_eq!(s.usable, [CoopConfig::F16]);
    assert_eq!(s.config_for(false), None);
    assert_eq!(s.config_for(true), Some(CoopConfig::F16));
    assert!(s.features().contains(
        wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
            | wgpu::Features::SUBGROUP
            | wgpu::Features::SHADER_F16
    ));
    let no_f16 = detect(&CoopOffer {
        features: nvidia.features - wgpu::Features::SHADER_F16,
        ..nvidia.clone()
    });
    assert!(no_f16.usable.is_empty());
    assert!(no_f16.features().is_empty());
    let why = no_f16.missing.unwrap();
    assert!(
        why.contains("16×16×16 F16 → F32") && why.contains("shader-f16"),
        "{why}"
    );
    // Metal's list: 8×8 in f32 and in f16 → f32: both; a B in f16 takes the f16 one.
    let metal = CoopOffer {
        properties: vec![props(8, T::F32, T::F32), props(8, T::F16, T::F32)],
        subgroup_sizes: (32, 32),
        ..offer(wgpu::Backend::Metal, wgpu::Features::SHADER_F16)
    };
    let s = detect(&metal);
    assert_eq!(s.usable, [CoopConfig::F32, CoopConfig::F16Small]);
    assert_eq!(s.config_for(true), Some(CoopConfig::F16Small));
    assert_eq!(s.config_for(false), Some(CoopConfig::F32));
    // Mesa's lavapipe (26.x): 8×8×8 f16 → f16 and → f32 (and integer ones): f16 weights only.
    let lavapipe = CoopOffer {
        properties: vec![props(8, T::F16, T::F16), props(8, T::F16, T::F32)],
        ..offer(wgpu::Backend::Vulkan, wgpu::Features::SHADER_F16)
    };
    let s = detect(&lavapipe);
    assert_eq!(s.usable, [CoopConfig::F16Small]);
    assert_eq!(s.config_for(false), None);
}

#[test]
fn detection_refuses_dx12_gl_and_adapters_without_the_features() {
    // DX12: naga has no HLSL for cooperative matrices, so the kernel is never offered there,
    // whatever the adapter lists.
    for backend in [wgpu::Backend::Dx12, wgpu::Backend::Gl] {
        let s = detect(&offer(backend, wgpu::Features::SHADER_F16));
        assert!(
            s.usable.is_empty() && s.features().is_empty(),
            "{backend:?}"
        );
        let why = s.missing.unwrap();
        assert!(why.contains(&format!("{backend:?}")), "{why}");
        assert_eq!(s.offered.len(), 1, "what is listed is still reported");
    }
    let without = |f| CoopOffer {
        features: offer(wgpu::Backend::Vulkan, wgpu::Features::empty()).features - f,
        ..offer(wgpu::Backend::Vulkan, wgpu::Features::empty())
    };
    let s = detect(&without(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX));
    assert!(s.usable.is_empty());
    assert!(s.missing.unwrap().contains("`wgpu-cooperative-matrix`"));
    let s = detect(&without(wgpu::Features::SUBGROUP));
    assert!(s.missing.unwrap().contains("`subgroup`"));
    // Subgroups that do not divide the workgroup of 64 (or may be wider than it).
    for sizes in [(4, 128), (0, 0), (48, 48)] {
        let s = detect(&CoopOffer {
            subgroup_sizes: sizes,
            ..offer(wgpu::Backend::Vulkan, wgpu::Features::empty())
        });
        assert!(s.usable.is_empty(), "{sizes:?}");
        assert!(s.missing.unwrap().contains("workgroup of 64"));
    }
    // An adapter listing nothing: "none".
    let s = detect(&CoopOffer {
        properties: vec![],
        ..offer(wgpu::Backend::Vulkan, wgpu::Features::empty())
    });
    assert_eq!(s.offered_text(), "none");
    assert!(
        s.describe()
            .starts_with("cooperative matrices: none (not used: ")
    );
}

/// The context's report agrees with the device it made: the features are on exactly when a
/// configuration is usable, and without one the reason is given.
#[test]
fn the_device_has_the_features_exactly_when_a_configuration_is_usable() {
    let Some(Device::Gpu(ctx)) = gpu() else {
        return;
    };
    let s = ctx.coop();
    eprintln!("{}: {}", ctx.info().name, s.describe());
    let on = ctx
        .device
        .features()
        .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
    assert_eq!(on, !s.usable.is_empty(), "{s:?}");
    assert_eq!(s.missing.is_some(), s.usable.is_empty(), "{s:?}");
    if ctx.info().backend == "Dx12" {
        assert!(s.usable.is_empty());
    }
}

/// Forcing the kernel: on a device with a configuration for the product, it matches the f64
/// reference; on one without, the default rule's kernel does, and the error `train` gives for
/// the flag names what is missing.
fn forced_or_refused(g: &Device, m: usize, k: usize, n: usize, o: MatmulOpts, alpha: f32) {
    let Device::Gpu(ctx) = g else { unreachable!() };
    let what = format!("{m}x{k}x{n} {o:?} alpha {alpha}");
    let cpu = Device::cpu();
    let sa = if o.trans_a { [k, m] } else { [m, k] };
    let sb = if o.trans_b { [n, k] } else { [k, n] };
    let (a, b, bias) = (
        random(&sa, 1, &cpu),
        random(&sb, 2, &cpu),
        random(&[n], 3, &cpu),
    );
    let c0 = random(&[m, n], 4, &cpu);
    let want = crate::reference::matmul_tensors(&a, &b, Some(&bias), o).unwrap();
    let on = |t: &Tensor| t.to_device(g).unwrap();
    let (ga, gb, gbias, gc) = (on(&a), on(&b), on(&bias), on(&c0));
    let (got, _) = matmul_tiled::tests::forced(GpuMatmul::Coop, || {
        matmul_scaled(&ga, &gb, Some(&gbias), o, alpha)
            .and_then(|y| matmul_accumulate(&gc, &ga, &gb, o).map(|()| y))
    });
    if ctx.coop().usable.is_empty() {
        // What `train` says when the flag names a kernel this adapter cannot run at all.
        let e = unavailable(ctx, false).to_string();
        assert!(e.contains("--matmul-kernel coop"), "{e}");
        let why = ctx.coop().missing.clone().unwrap_or_default();
        assert!(e.contains(&why) && e.contains("it lists: "), "{e}");
    }
    // Without a configuration for the product, forcing leaves it to the default rule: the
    // same values either way.
    let got = got.unwrap();
    // α·(A·B) + bias: the reference is A·B + bias, so scale its product part.
    let want: Vec<f32> = want
        .to_vec()
        .unwrap()
        .iter()
        .zip(bias.to_vec().unwrap().iter().cycle())
        .map(|(y, b)| alpha * (y - b) + b)
        .collect();
    let want = Tensor::from_vec(want, &[m, n], &cpu).unwrap();
    let atol = 1e-5 * k.max(1) as f32;
    assert_close(&what, &got, &want, atol, 1e-5);
    let plain = crate::reference::matmul_tensors(&a, &b, None, o).unwrap();
    let acc: Vec<f32> = (c0.to_vec().unwrap().iter())
        .zip(plain.to_vec().unwrap())
        .map(|(c, y)| c + y)
        .collect();
    let acc = Tensor::from_vec(acc, &[m, n], &cpu).unwrap();
    assert_close(&format!("accumulate {what}"), &gc, &acc, atol + 1e-6, 1e-5);
}

#[test]
fn coop_or_its_fallback_matches_the_reference() {
    let Some(g) = gpu() else { return };
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let o = MatmulOpts {
            trans_a: ta,
            trans_b: tb,
        };
        // Smaller than a fragment, tiles and fragments cut on every side, K over two slices.
        forced_or_refused(&g, 3, 5, 7, o, 1.0);
        forced_or_refused(&g, 37, 70, 45, o, 0.5);
        forced_or_refused(&g, 64, 33, 96, o, -2.0);
    }
    // K = 0: only the bias (and C's old value).
    forced_or_refused(&g, 9, 0, 10, MatmulOpts::default(), 1.0);
}

/// Batched (B per batch entry, and one B shared by the batch, folded into rows) and the GELU
/// epilogue, against the CPU backend.
#[test]
fn coop_batches_and_gelu_match_the_cpu() {
    let Some(Device::Gpu(ctx)) = gpu() else {
        return;
    };
    let g = Device::Gpu(ctx.clone());
    let cpu = Device::cpu();
    let o = MatmulOpts {
        trans_a: true,
        trans_b: false,
    };
    let (a, b) = (random(&[3, 40, 19], 5, &cpu), random(&[3, 40, 23], 6, &cpu));
    let want = matmul(&a, &b, None, o).unwrap();
    let (ga, gb) = (a.to_device(&g).unwrap(), b.to_device(&g).unwrap());
    let (x, w, bias) = (
        random(&[2, 13, 50], 7, &cpu),
        random(&[50, 41], 8, &cpu),
        random(&[41], 9, &cpu),
    );
    let want_gelu = matmul_gelu(&x, &w, Some(&bias), MatmulOpts::default()).unwrap();
    let on = |t: &Tensor| t.to_device(&g).unwrap();
    let (got, _) = matmul_tiled::tests::forced(GpuMatmul::Coop, || {
        let y = matmul(&ga, &gb, None, o)?;
        let u = matmul_gelu(&on(&x), &on(&w), Some(&on(&bias)), MatmulOpts::default())?;
        Ok::<_, crate::Error>((y, u))
    });
    // Where the device has no f32 configuration, forcing the kernel leaves these products to
    // the default rule: the same values either way.
    let (y, (u, gelu)) = got.unwrap();
    assert_close("batched", &y, &want, 1e-5 * 40.0, 1e-5);
    assert_close("gelu u", &u, &want_gelu.0, 1e-5 * 50.0, 1e-5);
    assert_close("gelu g", &gelu, &want_gelu.1, 1e-5 * 50.0, 1e-5);
}

/// A B stored in f16 (`--precision f16`): the f16 configuration where the device has it (A
/// rounded to f16: each product off by at most 2⁻¹⁰·|a·b|, so with |a|, |b| ≤ 1 a sum of K of
/// them by 2⁻¹⁰·K, plus f32 rounding), else the f32 one with the halves widened exactly; on a
/// device with neither, the default rule's kernels.
#[test]
fn coop_f16_weights_match_the_rounded_reference_within_the_stated_tolerance() {
    let Some(Device::Gpu(ctx)) = gpu() else {
        return;
    };
    let g = Device::Gpu(ctx.clone());
    let cpu = Device::cpu();
    for (trans_w, [m, k, n]) in [(false, [5, 70, 101]), (true, [33, 48, 17])] {
        let stored = if trans_w { [n, k] } else { [k, n] };
        let values = random_vec(k * n, 11);
        let xs = random_vec(m * k, 12);
        let w = F16Tensor::from_f32("w", &values, &stored, &g).unwrap();
        let rounded = Tensor::from_vec(w.to_f32().unwrap(), &stored, &cpu).unwrap();
        let x = Tensor::from_vec(xs, &[m, k], &cpu).unwrap();
        let bias = random(&[n], 13, &cpu);
        let o = MatmulOpts {
            trans_a: false,
            trans_b: trans_w,
        };
        let want = crate::reference::matmul_tensors(&x, &rounded, Some(&bias), o).unwrap();
        let (gx, gbias) = (x.to_device(&g).unwrap(), bias.to_device(&g).unwrap());
        let (got, _) = matmul_tiled::tests::forced(GpuMatmul::Coop, || {
            matmul_f16(&gx, &w, Some(&gbias), trans_w)
        });
        let what = format!("f16 weight {m}x{k}x{n} trans_w {trans_w}");
        if let Some(config) = ctx.coop().config_for(true) {
            // The configuration ran its self-check before its first product, and passed.
            assert_eq!(ctx.coop().check(config).get(), Some(&None), "{what}");
        }
        let atol = match ctx.coop().config_for(true) {
            Some(CoopConfig::F16 | CoopConfig::F16Small) => {
                2f32.powi(-10) * k as f32 + 1e-5 * k as f32
            }
            // The f32 configuration, or (none at all) the default rule's kernels: halves widened
            // exactly, f32 sums.
            Some(CoopConfig::F32) | None => 1e-5 * k as f32,
        };
        let got = got.unwrap();
        let err = got
            .to_vec()
            .unwrap()
            .iter()
            .zip(want.to_vec().unwrap())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        eprintln!(
            "{what}: {:?}, max |error| {err:e} (bound {atol:e})",
            ctx.coop().config_for(true)
        );
        assert_close(&what, &got, &want, atol, 0.0);
    }
}

/// The tuner measures the kernel only where the device has it: a product tuned here writes a
/// class with ` coop` and may answer `coop` exactly when the device has a configuration for it.
#[test]
fn the_tuner_offers_coop_only_where_the_device_has_it() {
    let Some(Device::Gpu(ctx)) = gpu() else {
        return;
    };
    let g = Device::Gpu(ctx.clone());
    let dir = std::env::temp_dir().join(format!("coop-tune-{}", std::process::id()));
    let path = dir.join("tune.tsv");
    let _ = std::fs::remove_file(&path);
    matmul_tune::tests::PATH.with(|p| *p.borrow_mut() = Some(path.clone()));
    matmul_tune::forget();
    let (a, b) = (random(&[256, 64], 1, &g), random(&[64, 256], 2, &g));
    let (y, _) = matmul_tiled::tests::forced(GpuMatmul::Tune, || {
        matmul(&a, &b, None, MatmulOpts::default())
    });
    y.unwrap().to_vec().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    matmul_tune::tests::PATH.with(|p| *p.borrow_mut() = None);
    matmul_tune::forget();
    let _ = std::fs::remove_dir_all(&dir);
    let has = ctx.coop().config_for(false).is_some();
    assert_eq!(text.contains(" coop\t"), has, "{text}");
    if !has {
        assert!(!text.ends_with("\tcoop\n"), "{text}");
    }
}

/// A configuration that failed its self-check is reported as not used, with what was wrong.
#[test]
fn a_failed_self_check_is_reported_by_name() {
    let mut offer = offer(wgpu::Backend::Vulkan, wgpu::Features::SHADER_F16);
    offer.properties.push(props(8, T::F16, T::F32));
    let s = detect(&offer);
    assert_eq!(s.usable, [CoopConfig::F32, CoopConfig::F16Small]);
    assert!(
        s.describe().contains("`--matmul-kernel coop` uses"),
        "{}",
        s.describe()
    );
    s.check(CoopConfig::F16Small)
        .set(Some(
            "a 67×83×45 product gave 1 at (0, 0) where 2 is exact".into(),
        ))
        .unwrap();
    let d = s.describe();
    assert!(
        d.contains("not used: f16 8×8×8 → f32 failed its self-check: a 67×83×45 product"),
        "{d}"
    );
    // A passed check changes nothing in the line.
    let t = detect(&offer);
    t.check(CoopConfig::F32).set(None).unwrap();
    assert!(
        t.describe().contains("`--matmul-kernel coop` uses"),
        "{}",
        t.describe()
    );
}
