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
            Ok(ctx) => println!("GPU adapter: {}", ctx.info()),
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
pub fn open(choice: DeviceChoice) -> crate::Result<Device> {
    let (device, note) = Device::select_explained(choice)?;
    if let Some(note) = note {
        eprintln!("note: {note}");
    }
    eprintln!("device: {}", device.describe());
    Ok(device)
}
