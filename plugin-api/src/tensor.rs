//! Tensors across the plugin boundary: an owning [`TensorHandle`] and a borrowed [`TensorRef`].
//!
//! `tch::Tensor` is a pointer to a heap `at::Tensor`. Host and plugins call into the same
//! `libtorch_cpu.so`, so whichever side drops a handle frees it correctly. Never put a tensor
//! you keep into an owning handle: hand over a `shallow_clone()` (same storage, new owner).

use abi_stable::{marker_type::ErasedObject, std_types::RString, StableAbi};
use std::{marker::PhantomData, mem::ManuallyDrop, ptr::NonNull};
use tch::Tensor;

/// Owns one `at::Tensor`.
#[repr(transparent)]
#[derive(StableAbi)]
pub struct TensorHandle {
    ptr: NonNull<ErasedObject>,
}

// SAFETY: an at::Tensor handle may move between threads (tch::Tensor is Send).
unsafe impl Send for TensorHandle {}

impl TensorHandle {
    pub fn new(tensor: Tensor) -> Self {
        let mut tensor = ManuallyDrop::new(tensor);
        let ptr = tensor.as_mut_ptr() as *mut ErasedObject;
        TensorHandle {
            ptr: NonNull::new(ptr).expect("tch::Tensor holds a null pointer"),
        }
    }

    pub fn into_tensor(self) -> Tensor {
        let this = ManuallyDrop::new(self);
        // SAFETY: the pointer came from a live tch::Tensor whose ownership we hold.
        unsafe { Tensor::from_ptr(this.ptr.as_ptr() as *mut _) }
    }
}

impl Drop for TensorHandle {
    fn drop(&mut self) {
        // SAFETY: we own the at::Tensor; rebuilding the tch::Tensor frees it exactly once.
        drop(unsafe { Tensor::from_ptr(self.ptr.as_ptr() as *mut _) });
    }
}

/// Borrows a tensor for the duration of one call.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy)]
pub struct TensorRef<'a> {
    ptr: NonNull<ErasedObject>,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> TensorRef<'a> {
    pub fn new(tensor: &'a Tensor) -> Self {
        let ptr = tensor.as_ptr() as *mut ErasedObject;
        TensorRef {
            ptr: NonNull::new(ptr).expect("tch::Tensor holds a null pointer"),
            _borrow: PhantomData,
        }
    }

    /// A shallow clone (same storage and autograd history) the callee may keep.
    pub fn to_tensor(self) -> Tensor {
        // SAFETY: the pointer is a live at::Tensor for 'a; clone_from_ptr makes a new owner.
        unsafe { Tensor::clone_from_ptr(self.ptr.as_ptr() as *mut _) }
    }
}

/// A named tensor crossing the boundary (model parameters, optimizer state).
#[repr(C)]
#[derive(StableAbi)]
pub struct NamedTensorFfi {
    pub name: RString,
    pub tensor: TensorHandle,
    pub trainable: bool,
}

impl From<crate::NamedTensor> for NamedTensorFfi {
    fn from(t: crate::NamedTensor) -> Self {
        NamedTensorFfi {
            name: t.name.into(),
            tensor: TensorHandle::new(t.tensor),
            trainable: t.trainable,
        }
    }
}

impl From<NamedTensorFfi> for crate::NamedTensor {
    fn from(t: NamedTensorFfi) -> Self {
        crate::NamedTensor {
            name: t.name.into_string(),
            tensor: t.tensor.into_tensor(),
            trainable: t.trainable,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_transfer_ownership_and_refs_share_storage() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let h = TensorHandle::new(t.shallow_clone());
        let back = h.into_tensor();
        assert_eq!(Vec::<f32>::try_from(&back).unwrap(), vec![1.0, 2.0, 3.0]);
        let r = TensorRef::new(&t);
        let mut shared = r.to_tensor();
        let _ = shared.g_add_scalar_(1.0);
        assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![2.0, 3.0, 4.0]);
        // Dropping a handle that was never converted back frees it (no double free, no leak
        // visible here; valgrind runs in the PoC showed flat RSS).
        for _ in 0..1000 {
            drop(TensorHandle::new(Tensor::zeros(
                [16],
                (tch::Kind::Float, tch::Device::Cpu),
            )));
        }
    }
}
