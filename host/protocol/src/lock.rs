//! Locks that recover from poisoning, for every crate of qmpgate.
//!
//! A panic while a lock is held poisons it; qmpgate's critical sections only
//! insert, remove or replace whole values, so the data behind a poisoned lock is
//! still consistent, and serving on is better than taking every later caller down
//! with the first.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, recovering it if poisoned.
pub fn mutex<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Read-locks `lock`, recovering it if poisoned.
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks `lock`, recovering it if poisoned.
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}
