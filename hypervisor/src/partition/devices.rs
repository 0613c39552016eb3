//! The platform's devices, in the order the DSDT lists them. Adding a device is its own file
//! implementing [`PlatformDevice`] (bus ranges, interrupt lines, DSDT entry) and one line
//! here; a VMBus device is offered through `PartitionConfig::vmbus_devices` instead.

use std::sync::Arc;

use super::PartitionConfig;
use crate::devices::i8042::I8042Controller;
use crate::devices::platform::PlatformDevice;
use crate::devices::pm::AcpiPm;
use crate::devices::pvpanic::PvPanicPort;
use crate::devices::serial::Com1;
use crate::devices::virtio_blk::VirtioBlkSlot;
use crate::vmbus::VmbusWindow;

/// Every device of a partition built from `config`.
pub(super) fn platform(
    config: &PartitionConfig,
    vmbus: bool,
    com1: &Arc<Com1>,
    pm: &Arc<AcpiPm>,
) -> Vec<Arc<dyn PlatformDevice>> {
    let mut devices: Vec<Arc<dyn PlatformDevice>> = vec![
        com1.clone(),
        Arc::new(I8042Controller),
        pm.clone(),
        Arc::new(PvPanicPort),
    ];
    for (i, disk) in config.disks.iter().enumerate() {
        devices.push(Arc::new(VirtioBlkSlot::new(
            i,
            disk.device.clone(),
            disk.counters.clone(),
        )));
    }
    if vmbus {
        devices.push(Arc::new(VmbusWindow));
    }
    devices
}
