//! `train devices`: what wgpu sees, and what `--device auto` would choose.

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
            Ok(ctx) => println!("GPU adapter: {}", ctx.info()),
            Err(e) => println!(
                "GPU adapter: {} ({:?}) cannot be opened: {e}",
                info.name, info.backend
            ),
        }
    }
    println!("{}", Device::cpu().describe());
    let auto = Device::select(DeviceChoice::Auto)?;
    println!("--device auto picks: {}", auto.describe());
    Ok(())
}
