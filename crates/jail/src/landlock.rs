//! The Landlock layer: read and execute everywhere the view shows, write only in the writable
//! roots, the private temporary directories, `/dev` and `/proc`; and (ABI 6) signals and
//! abstract unix sockets scoped to the jail: the agent can neither signal the CLI that started
//! it nor reach an abstract socket served outside. Landlock also refuses every mount change to
//! a sandboxed process.

use std::path::Path;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope,
};

use crate::JailError;
use crate::policy::JailPolicy;

/// The ABI the jail is written against (signal and abstract-socket scoping).
pub const REQUIRED_ABI: i32 = 6;

/// Restricts this process (and what it starts) per `policy`.
///
/// # Errors
/// [`JailError::Landlock`] when a rule cannot be made or (unless best-effort) the kernel
/// cannot enforce all of it.
pub fn restrict(policy: &JailPolicy) -> Result<(), JailError> {
    let err = |e: &dyn std::fmt::Display| JailError::Landlock(e.to_string());
    let abi = ABI::V6;
    let level = if policy.best_effort {
        CompatLevel::BestEffort
    } else {
        CompatLevel::HardRequirement
    };
    let all = AccessFs::from_all(abi);
    let read = AccessFs::from_read(abi);
    let mut rs = Ruleset::default()
        .set_compatibility(level)
        .handle_access(all)
        .map_err(|e| err(&e))?
        .scope(Scope::from_all(abi))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?;
    let root = PathFd::new("/").map_err(|e| err(&e))?;
    rs = rs
        .add_rule(PathBeneath::new(root, read))
        .map_err(|e| err(&e))?;
    let extra = ["/dev", "/proc"].map(Path::new);
    for p in policy
        .writable
        .iter()
        .map(|p| p.as_path())
        .chain(policy.private_tmp.iter().map(|p| p.as_path()))
        .chain(extra)
    {
        if !p.exists() {
            continue;
        }
        let fd = PathFd::new(p).map_err(|e| err(&e))?;
        rs = rs
            .add_rule(PathBeneath::new(fd, all))
            .map_err(|e| err(&e))?;
    }
    let status = rs.restrict_self().map_err(|e| err(&e))?;
    if !policy.best_effort && status.ruleset != RulesetStatus::FullyEnforced {
        return Err(JailError::Landlock(format!(
            "not fully enforced ({:?})",
            status.ruleset
        )));
    }
    Ok(())
}
