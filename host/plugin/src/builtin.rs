//! The plugins embedded in qmpgate's binary, built from `guest-plugins/` by this
//! crate's build script. They are statics, not consts: a built-in is recognised
//! by its address (a const may be copied per crate, and so have several).

/// The qmp-policy plugin, built from `guest-plugins/qmp-policy` and embedded.
pub static POLICY: &[u8] = include_bytes!(env!("QMPGATE_BUILTIN_POLICY"));

/// The hmp plugin (HMP command lines in QMP terms), built from `guest-plugins/hmp`.
pub static HMP: &[u8] = include_bytes!(env!("QMPGATE_BUILTIN_HMP"));

/// The audit plugin (one record per decision), built from `guest-plugins/audit`.
pub static AUDIT: &[u8] = include_bytes!(env!("QMPGATE_BUILTIN_AUDIT"));

/// Built-in plugins by name.
pub fn by_name(name: &str) -> Option<&'static [u8]> {
    match name {
        "qmp-policy" => Some(POLICY),
        "hmp" => Some(HMP),
        "audit" => Some(AUDIT),
        _ => None,
    }
}
