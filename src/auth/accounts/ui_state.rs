//! What the admin page changed about device users — devices it added, the
//! enabled flag, a password it reset — kept in a small TOML file of its own
//! (by default `admin-state.toml` beside the token store) and laid over the
//! `[[account.device]]` tables of the configuration at start, on SIGHUP and
//! when the page saves. The configuration file stays the operator's: the
//! page never rewrites it.
//!
//! Holds Argon2id hashes, never a password; the file is written mode 0600
//! by rename, so a crash leaves the old file or the new one.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::config::{AccountConfig, AccountMode, DeviceConfig};
use crate::auth::tokens::TokenStoreConfig;

/// File name beside the token store.
pub const DEFAULT_FILE_NAME: &str = "admin-state.toml";
/// Devices the file may hold (a fleet, not a directory).
pub const MAX_DEVICES: usize = 10_000;
/// The file is refused beyond this size.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiState {
    #[serde(default, rename = "device", skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<UiDevice>,
}

/// One device user the page added or changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiDevice {
    /// The mapped account it belongs to.
    pub account: String,
    pub user: String,
    /// Set when the page added the device or reset its password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Set when the page enabled or disabled the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// Where the state file is: `configured`, or beside the token store.
pub fn state_path(configured: Option<&Path>, token_store: Option<&TokenStoreConfig>) -> Option<PathBuf> {
    match configured {
        Some(path) => Some(path.to_path_buf()),
        None => token_store.map(|store| store.path.with_file_name(DEFAULT_FILE_NAME)),
    }
}

impl UiState {
    /// The file's state; a missing file is an empty state.
    pub fn load(path: &Path) -> Result<UiState, String> {
        let shown = path.display();
        let metadata = match std::fs::metadata(path) {
            Ok(metadata) => metadata,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(UiState::default()),
            Err(e) => return Err(format!("{shown}: {e}")),
        };
        if metadata.len() > MAX_FILE_BYTES {
            return Err(format!("{shown}: larger than {MAX_FILE_BYTES} bytes"));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{shown}: {e}"))?;
        let state: UiState = toml::from_str(&text).map_err(|e| format!("{shown}: {e}"))?;
        if state.devices.len() > MAX_DEVICES {
            return Err(format!("{shown}: more than {MAX_DEVICES} devices"));
        }
        Ok(state)
    }

    /// Writes the state (mode 0600, replaced by rename).
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = toml::to_string_pretty(self).map_err(|e| e.to_string())?;
        let temporary = path.with_extension("toml.new");
        let shown = path.display();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|e| format!("{}: {e}", temporary.display()))?;
        file.write_all(b"# Written by popgate's admin page; laid over [[account.device]] of the configuration.\n")
            .and_then(|()| file.write_all(text.as_bytes()))
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("{}: {e}", temporary.display()))?;
        std::fs::rename(&temporary, path).map_err(|e| format!("{shown}: {e}"))
    }

    /// The entry for `user`, created for `account` if there is none.
    pub fn device_mut(&mut self, account: &str, user: &str) -> Result<&mut UiDevice, String> {
        match self.devices.iter().position(|d| d.user == user) {
            Some(i) => Ok(&mut self.devices[i]),
            None if self.devices.len() >= MAX_DEVICES => Err(format!("at most {MAX_DEVICES} devices")),
            None => {
                self.devices.push(UiDevice {
                    account: account.to_string(),
                    user: user.to_string(),
                    password_hash: None,
                    enabled: None,
                });
                Ok(self.devices.last_mut().expect("just pushed"))
            }
        }
    }

    /// Lays the state over `accounts`: a device the configuration has gets
    /// the page's flag and hash; a device it does not have is added to its
    /// account. An entry for a device the configuration no longer has and
    /// that carries no hash changes nothing. The result is checked with the
    /// configuration's own rules afterwards.
    pub fn merge_into(&self, accounts: &mut [AccountConfig]) -> Result<(), String> {
        for entry in &self.devices {
            let Some(account) = accounts.iter_mut().find(|a| a.name == entry.account) else {
                return Err(format!("device `{}`: account `{}` is not configured", entry.user, entry.account));
            };
            if account.mode != AccountMode::Mapped {
                return Err(format!("device `{}`: account `{}` is not a mapped account", entry.user, entry.account));
            }
            match account.device.iter_mut().find(|d| d.user == entry.user) {
                Some(device) => {
                    if let Some(hash) = &entry.password_hash {
                        device.password_hash = hash.clone();
                    }
                    if let Some(enabled) = entry.enabled {
                        device.enabled = enabled;
                    }
                }
                None => {
                    if let Some(hash) = &entry.password_hash {
                        account.device.push(DeviceConfig {
                            user: entry.user.clone(),
                            password_hash: hash.clone(),
                            enabled: entry.enabled.unwrap_or(true),
                            policy: None,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$9KMzOwvjnCuvnxHSoHS9YFRbsrmm3rS0avZZR0g2iFc";

    fn account() -> AccountConfig {
        toml::from_str(&format!(
            "name = \"office\"\nmode = \"mapped\"\nlogin = \"office@example.com\"\npassword_env = \"X\"\n\
             [[device]]\nuser = \"printer\"\npassword_hash = \"{HASH}\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn the_page_disables_a_configured_device_and_adds_another() {
        let mut state = UiState::default();
        state.device_mut("office", "printer").unwrap().enabled = Some(false);
        state.device_mut("office", "scanner").unwrap().password_hash = Some("other".into());
        let mut accounts = vec![account()];
        state.merge_into(&mut accounts).unwrap();
        let devices = &accounts[0].device;
        assert_eq!(
            (devices[0].user.as_str(), devices[0].enabled, devices[0].password_hash.as_str()),
            ("printer", false, HASH)
        );
        assert_eq!(
            (devices[1].user.as_str(), devices[1].enabled, devices[1].password_hash.as_str()),
            ("scanner", true, "other")
        );
    }

    #[test]
    fn a_device_of_an_unknown_account_is_an_error_naming_both() {
        let mut state = UiState::default();
        state.device_mut("gone", "printer").unwrap().enabled = Some(true);
        let error = state.merge_into(&mut [account()]).unwrap_err();
        assert!(error.contains("gone") && error.contains("printer"), "{error}");
    }

    #[test]
    fn it_round_trips_through_its_file_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEFAULT_FILE_NAME);
        assert_eq!(UiState::load(&path).unwrap(), UiState::default());
        let mut state = UiState::default();
        state.device_mut("office", "printer").unwrap().password_hash = Some(HASH.into());
        state.save(&path).unwrap();
        assert_eq!(UiState::load(&path).unwrap(), state);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
