//! `train devices`: what wgpu sees, and what `--device auto` would choose; and [`open`], which
//! turns `--device` into a device for every other subcommand and says which one it got (and,
//! when `auto` fell back to the CPU, why).

use tensor::{Device, DeviceChoice, GpuContext, GpuOptions};

/// Print every adapter, the CPU backend and the automatic choice.
pub fn print_devices() -> crate::Result<()> {
    let adapters = tensor::gpu::adapters();
    if adapters.is_empty() {
        println!(
            "GPU adapters: none found (WGPU_BACKEND={:?})",
            std::env::var("WGPU_BACKEND").ok()
        );
    }
    for adapter in adapters {
        let info = adapter.get_info();
        match GpuContext::from_adapter(adapter, &GpuOptions::default()) {
            Ok(ctx) => {
                println!("GPU adapter: {}", ctx.info());
                println!("  {}", ctx.coop().describe());
            }
            Err(e) => println!(
                "GPU adapter: {} ({:?}) cannot be opened: {e}",
                info.name, info.backend
            ),
        }
    }
    println!("{}", Device::cpu().describe());
    let (auto, note) = Device::select_explained(DeviceChoice::Auto)?;
    println!("--device auto picks: {}", auto.describe());
    if let Some(note) = note {
        println!("  ({note})");
    }
    Ok(())
}

/// Open the device `choice` names, and say on stderr which it is. `gpu` with no usable adapter
/// is an error naming the backends asked and the adapters that exist; `auto` without a hardware
/// GPU takes the CPU and says why.
///
/// `--matmul-kernel coop` on a GPU without any cooperative-matrix configuration the kernel can
/// run fails here, before any work, naming what the adapter lacks and what it lists. With one,
/// the products it has no configuration for (f32 products where only f16 ones are listed) take
/// the default rule.
pub fn open(choice: DeviceChoice) -> crate::Result<Device> {
    let (device, note) = Device::select_explained(choice)?;
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    eprintln!("device: {}", device.describe());
    if let Device::Gpu(ctx) = &device
        && tensor::ops::matmul::gpu_matmul() == tensor::ops::matmul::GpuMatmul::Coop
    {
        if ctx.coop().usable.is_empty() {
            return Err(tensor::ops::matmul_coop::unavailable(ctx, false).into());
        }
        eprintln!("matmul kernel: {}", ctx.coop().describe());
    }
    Ok(device)
}
