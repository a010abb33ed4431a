"""How `auto` picks a GPU backend: by measurement per op, size bucket and device class, else by
the static estimate order. devices: device classes and simulated GPUs; estimates: the static
order; tables: buckets, the measured tables (<class>.json beside this file, and the user's
`python -m fastlm tune` cache) and the choice an entry supports; tune: the measuring."""
from fastlm.dispatch.devices import SIMULATED, DeviceSpec, device_class
from fastlm.dispatch.estimates import REFERENCE_IS_TORCH_OP, STATIC_ORDER, static_order
from fastlm.dispatch.tables import attention_bucket, choose, matmul_bucket, rowwise_bucket

__all__ = ["SIMULATED", "DeviceSpec", "device_class", "REFERENCE_IS_TORCH_OP", "STATIC_ORDER", "static_order",
           "attention_bucket", "choose", "matmul_bucket", "rowwise_bucket"]
