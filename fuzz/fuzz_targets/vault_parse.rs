//! The `vault.enc` parser (`VaultIndex::parse`, which `VaultIndex::read` uses), fed arbitrary
//! bytes as a damaged or planted file could hold.
//!
//! Properties: no panic; an accepted index lists only valid service names, and opening each entry
//! with a key that is not the vault's fails cleanly (wrong key or tampered), never panics.
#![no_main]

use std::path::PathBuf;

use agentkeys_state::error::StateError;
use agentkeys_state::vault::{VaultIndex, validate_service_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let index = match VaultIndex::parse(PathBuf::from("/fuzz/vault.enc"), data) {
        Ok(index) => index,
        Err(e) => {
            assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
            return;
        }
    };
    assert!(index.stamp().is_none());
    let list = index.list();
    assert_eq!(list.len(), index.len());
    let key = [0x5au8; 32];
    let key_ok = index.check_key(&key).is_ok();
    for meta in list {
        assert!(validate_service_name(&meta.service).is_ok());
        assert_eq!(
            index.meta(&meta.service).map(|m| m.updated),
            Some(meta.updated)
        );
        match index.open_entry(&key, &meta.service) {
            // Only possible if the input was sealed under this very key.
            Ok(plain) => assert!(plain.is_some() && key_ok),
            Err(StateError::DekWrong { .. }) => assert!(!key_ok),
            Err(StateError::EntryTampered { .. }) => assert!(key_ok),
            Err(e) => panic!("unexpected error opening an entry: {e}"),
        }
    }
    // Not a valid service name, so no accepted vault has it.
    assert!(matches!(
        index.open_entry(&key, "No Such Service"),
        Ok(None)
    ));
});
