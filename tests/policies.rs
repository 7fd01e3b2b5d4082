//! Device mailbox policies end to end (`[account.policy]`,
//! `[account.device.policy]`): mail from senders a device is not allowed
//! is neither listed nor retrievable and stays in the mailbox; `on_delete =
//! "keep"` deletes nothing after DELE + QUIT; a device's key beats its
//! account's; check-config refuses what a backend cannot do. On a real
//! Dovecot and on the demo backend, through curl, Python's poplib and the
//! harness's own POP3 client.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use popgate::auth::passwords::hash_password;
use popgate::config::Config;
use support::dovecot::{ALICE, Dovecot};
use support::gateway::GatewayProcess;
use support::messages::canonical;
use support::pop3::Dialogue as _;
use support::pop3::Pop3;
use support::program::{curl_lists, curl_retrieves_each, describe, poplib_retrieves_and_deletes};

const PRINTER_1: (&str, &str) = ("printer-1", "pw-one");
const PRINTER_2: (&str, &str) = ("printer-2", "pw-two");
const PRINTER_3: (&str, &str) = ("printer-3", "pw-three");
const LOBBY_PRINTER: (&str, &str) = ("lobby-printer", "pw-lobby");
const LOBBY_ADMIN: (&str, &str) = ("lobby-admin", "pw-admin");

/// A message from `from` (a whole From header value).
fn from(from: &str, subject: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: printer@example.com\r\nSubject: {subject}\r\n\
         Message-ID: <{}@example.com>\r\n\r\nPlease print \"{subject}\".\r\n",
        subject.replace(' ', "-")
    )
    .into_bytes()
}

fn office() -> Vec<u8> {
    from("Office <clerk@office.example>", "office invoice")
}
/// A display name that spells an allowed address decides nothing.
fn spam() -> Vec<u8> {
    from("\"clerk@office.example\" <evil@spam.example>", "spam to print")
}
fn boss() -> Vec<u8> {
    from("The Boss <Boss@Example.ORG>", "boss memo")
}
fn partner() -> Vec<u8> {
    from("orders@partner.example", "partner order")
}

struct World {
    dovecot: Dovecot,
    _dir: tempfile::TempDir,
    config: PathBuf,
}

impl World {
    /// Dovecot holds alice's mailbox (account "office": printer-1 with the
    /// account's policy, printer-2 with its own); the demo backend holds
    /// "lobby" (lobby-printer keeps, lobby-admin sees more senders).
    fn new() -> World {
        let dovecot = Dovecot::start();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("office-password"), format!("{}\n", ALICE.1)).unwrap();
        std::fs::write(dir.path().join("lobby-password"), "anything\n").unwrap();
        let demo = dir.path().join("demo");
        std::fs::create_dir(&demo).unwrap();
        std::fs::write(demo.join("01-office.eml"), office()).unwrap();
        std::fs::write(demo.join("02-spam.eml"), spam()).unwrap();
        std::fs::write(demo.join("03-partner.eml"), partner()).unwrap();
        let config = dir.path().join("popgate.toml");
        let text = format!(
            r#"
[backend]
kind = "demo"
messages_dir = "{dir}/demo"

[backends.dovecot]
kind = "imap"
host = "127.0.0.1"
port = {port}
tls = "none"

[[account]]
name = "office"
mode = "mapped"
backend = "dovecot"
login = "alice"
password_file = "{dir}/office-password"

[account.policy]
allowed_senders = ["office.example", "boss@example.org"]

[[account.device]]
user = "{p1}"
password_hash = "{h1}"

[[account.device]]
user = "{p2}"
password_hash = "{h2}"

[account.device.policy]
allowed_senders = ["@partner.example"]
on_delete = "keep"

[[account.device]]
user = "{p3}"
password_hash = "{h3}"

[account.device.policy]
on_delete = "flag"

[[account]]
name = "lobby"
mode = "mapped"
login = "lobby"
password_file = "{dir}/lobby-password"

[account.policy]
allowed_senders = ["office.example"]

[[account.device]]
user = "{lp}"
password_hash = "{hlp}"

[account.device.policy]
on_delete = "keep"

[[account.device]]
user = "{la}"
password_hash = "{hla}"

[account.device.policy]
allowed_senders = ["office.example", "partner.example", "spam.example"]
"#,
            port = dovecot.imap_port,
            dir = dir.path().display(),
            p1 = PRINTER_1.0,
            h1 = hash_password(PRINTER_1.1).unwrap(),
            p2 = PRINTER_2.0,
            h2 = hash_password(PRINTER_2.1).unwrap(),
            p3 = PRINTER_3.0,
            h3 = hash_password(PRINTER_3.1).unwrap(),
            lp = LOBBY_PRINTER.0,
            hlp = hash_password(LOBBY_PRINTER.1).unwrap(),
            la = LOBBY_ADMIN.0,
            hla = hash_password(LOBBY_ADMIN.1).unwrap(),
        );
        std::fs::write(&config, text).unwrap();
        Config::load(&config).unwrap_or_else(|e| panic!("test configuration: {e}"));
        World { dovecot, _dir: dir, config }
    }

    fn gateway(&self) -> GatewayProcess {
        GatewayProcess::start(&["--config", self.config.to_str().unwrap()])
    }
}

fn auth((user, password): (&str, &str)) -> [String; 2] {
    ["--user".to_string(), format!("{user}:{password}")]
}

#[test]
fn dovecot_hides_mail_from_senders_not_allowed_and_never_deletes_it() {
    let world = World::new();
    let raws = [office(), spam(), boss(), partner()];
    let uids = world.dovecot.append_all(ALICE.0, &raws);
    let gateway = world.gateway();
    let printer = auth(PRINTER_1);
    let printer: Vec<&str> = printer.iter().map(String::as_str).collect();

    // curl sees exactly the allowed two, numbered 1 and 2, and LIST == RETR.
    curl_lists(gateway.addr, &printer, &[&raws[0], &raws[2]]);
    curl_retrieves_each(gateway.addr, &printer, &[raws[0].clone(), raws[2].clone()]);

    // Reading headers to decide marks nothing read.
    let seen: Vec<u32> = world
        .dovecot
        .messages(ALICE.0)
        .into_iter()
        .filter(|m| m.flags.iter().any(|f| f.eq_ignore_ascii_case("\\Seen")))
        .map(|m| m.uid)
        .collect();
    assert!(!seen.contains(&uids[1]) && !seen.contains(&uids[3]), "hidden messages marked read: {seen:?}");

    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    let total = canonical(&raws[0]).len() + canonical(&raws[2]).len();
    assert_eq!(pop.ok("STAT"), format!("+OK 2 {total}"));
    assert_eq!(pop.uidl().len(), 2);
    pop.err("RETR 3");
    pop.err("LIST 3");
    pop.err("TOP 4 0");
    pop.ok("DELE 1");
    pop.ok("DELE 2");
    assert!(pop.ok("QUIT").contains("(2 messages deleted)"));
    // The spoofed and the partner's message are still there, untouched.
    assert_eq!(world.dovecot.uids(ALICE.0), vec![uids[1], uids[3]]);
    assert_eq!(canonical(&world.dovecot.fetch(ALICE.0, uids[1])), canonical(&raws[1]));

    let mut again = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert_eq!(again.ok("STAT"), "+OK 0 0");
    again.ok("QUIT");
    let log = gateway.log();
    assert!(log.contains("messages hidden by the device policy"), "{log}");
}

#[test]
fn dovecot_device_override_beats_the_account_and_keep_deletes_nothing() {
    let world = World::new();
    let raws = [office(), spam(), partner()];
    let uids = world.dovecot.append_all(ALICE.0, &raws);
    let gateway = world.gateway();

    // printer-2's own list (only the partner) replaces the account's, and
    // its on_delete = "keep" makes DELE a dry run.
    let mut pop = Pop3::login(gateway.addr, PRINTER_2.0, PRINTER_2.1);
    assert_eq!(pop.ok("STAT"), format!("+OK 1 {}", canonical(&raws[2]).len()));
    pop.ok("RETR 1");
    assert_eq!(pop.body(), canonical(&raws[2]));
    pop.ok("DELE 1");
    assert!(pop.ok("QUIT").contains("(0 messages deleted)"));
    assert_eq!(world.dovecot.uids(ALICE.0), uids);
    // And again: the same message, still there.
    let mut again = Pop3::login(gateway.addr, PRINTER_2.0, PRINTER_2.1);
    assert_eq!(again.ok("STAT"), format!("+OK 1 {}", canonical(&raws[2]).len()));
    again.ok("DELE 1");
    again.ok("QUIT");
    assert_eq!(world.dovecot.uids(ALICE.0), uids);

    // printer-1 has the account's policy: its own senders, real deletes.
    let mut first = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert_eq!(first.ok("STAT"), format!("+OK 1 {}", canonical(&raws[0]).len()));
    first.ok("DELE 1");
    assert!(first.ok("QUIT").contains("(1 messages deleted)"));
    assert_eq!(world.dovecot.uids(ALICE.0), uids[1..]);

    let log = gateway.log();
    assert!(log.contains("on_delete = keep: nothing removed"), "{log}");
}

/// The account's backend connections are shared by its devices' sessions
/// (one connection, here): what DELE means is the policy of the device
/// whose UPDATE it is, whichever device's login last used the connection.
/// printer-3 flags (`$Printed`) and printer-1 expunges; printer-1 logs in
/// and out between printer-3's login and its QUIT.
#[test]
fn each_devices_on_delete_holds_on_a_shared_connection() {
    let world = World::new();
    let raws = [office(), office()];
    let uids = world.dovecot.append_all(ALICE.0, &raws);
    let gateway = world.gateway();

    let mut flagger = Pop3::login(gateway.addr, PRINTER_3.0, PRINTER_3.1);
    assert!(flagger.ok("STAT").starts_with("+OK 2 "));
    let mut expunger = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert!(expunger.ok("STAT").starts_with("+OK 2 "));
    expunger.ok("QUIT");
    flagger.ok("DELE 1");
    flagger.ok("QUIT");
    assert_eq!(world.dovecot.uids(ALICE.0), uids, "printer-3 flags: nothing expunged");
    // Flagged, so hidden from printer-3 from now on; printer-1 still sees it.
    let mut flagger = Pop3::login(gateway.addr, PRINTER_3.0, PRINTER_3.1);
    assert!(flagger.ok("STAT").starts_with("+OK 1 "));
    flagger.ok("QUIT");

    // And the other way round: printer-1's DELE expunges, even though
    // printer-3's login came last on the connection.
    let mut expunger = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    assert!(expunger.ok("STAT").starts_with("+OK 2 "));
    let mut flagger = Pop3::login(gateway.addr, PRINTER_3.0, PRINTER_3.1);
    flagger.ok("QUIT");
    expunger.ok("DELE 2");
    assert!(expunger.ok("QUIT").contains("(1 messages deleted)"));
    assert_eq!(world.dovecot.uids(ALICE.0), uids[..1]);
}

#[test]
fn demo_backend_filters_and_keeps_through_poplib() {
    let world = World::new();
    let gateway = world.gateway();

    // The admin's own list shows all three (in the store's order).
    let mut admin = Pop3::login(gateway.addr, LOBBY_ADMIN.0, LOBBY_ADMIN.1);
    let uidls: Vec<String> = admin.uidl().into_iter().map(|(_, u)| u).collect();
    assert_eq!(uidls.len(), 3);
    admin.ok("QUIT");

    // The lobby printer (account list: office only; on_delete = keep)
    // retrieves and deletes everything it sees with poplib: one message.
    poplib_retrieves_and_deletes(gateway.addr, LOBBY_PRINTER, &[office()], &uidls[..1]);
    let mut printer = Pop3::login(gateway.addr, LOBBY_PRINTER.0, LOBBY_PRINTER.1);
    assert_eq!(printer.ok("STAT"), format!("+OK 1 {}", canonical(&office()).len()));
    printer.err("RETR 2");
    printer.ok("QUIT");

    // Nothing was removed, the hidden ones included…
    let admin_auth = auth(LOBBY_ADMIN);
    let admin_auth: Vec<&str> = admin_auth.iter().map(String::as_str).collect();
    let all = [office(), spam(), partner()];
    curl_lists(gateway.addr, &admin_auth, &[&all[0], &all[1], &all[2]]);
    // …and keep is the printer's alone: the admin's DELE removes.
    let mut admin = Pop3::login(gateway.addr, LOBBY_ADMIN.0, LOBBY_ADMIN.1);
    admin.ok("DELE 2");
    assert!(admin.ok("QUIT").contains("(1 messages deleted)"));
    curl_lists(gateway.addr, &admin_auth, &[&all[0], &all[2]]);
}

/// `popgate check-config` on `text` written to a file in `dir`.
fn check_config(dir: &Path, text: &str) -> std::process::Output {
    let path = dir.join("check.toml");
    std::fs::write(&path, text).unwrap();
    Command::new(env!("CARGO_BIN_EXE_popgate")).arg("check-config").arg(&path).output().unwrap()
}

#[test]
fn check_config_refuses_what_a_backend_cannot_do() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "x\n").unwrap();
    let hash = hash_password("pw").unwrap();
    let config = |account_policy: &str, device_policy: &str| {
        format!(
            r#"
[backend]
kind = "imap"
host = "127.0.0.1"
port = 143
tls = "none"

[[account]]
name = "office"
mode = "mapped"
login = "alice"
password_file = "{dir}/pw"
{account_policy}

[[account.device]]
user = "printer"
password_hash = "{hash}"
{device_policy}
"#,
            dir = dir.path().display()
        )
    };
    let fine = check_config(
        dir.path(),
        &config(
            "[account.policy]\nallowed_senders = [\"office.example\"]",
            "[account.device.policy]\non_delete = \"keep\"",
        ),
    );
    assert!(fine.status.success(), "{}", describe(&fine));

    for (account, device, why) in [
        ("[account.policy]\nrequire_dmarc_pass = true", "", "require_dmarc_pass needs `authserv_id`"),
        (
            "",
            "[account.device.policy]\non_delete = \"flag\"\nflag_keyword = \"\\\\Deleted\"",
            "device `printer`: policy.flag_keyword",
        ),
        ("[account.policy]\nallowed_senders = [\"not a domain\"]", "", "`not a domain` is not an address or domain"),
        ("[account.policy]\nallowed = []", "", "unknown field `allowed`"),
    ] {
        let refused = check_config(dir.path(), &config(account, device));
        assert!(!refused.status.success(), "{account} {device}: {}", describe(&refused));
        let text = describe(&refused);
        assert!(text.contains(why) || text.contains(&why.replace("\\\"", "\"")), "{why}: {text}");
    }
    // The new filters' keys are bounded and checked too.
    for (account, why) in [
        ("[account.policy]\nattachment_types = [\"pdf\"]", "`pdf` is not a media type"),
        (
            "[account.policy]\nattachment_types = [\"application/pdf\"]\nattachment_scan_limit_bytes = 1",
            "attachment_scan_limit_bytes",
        ),
        ("[account.policy]\nonly_unseen = \"yes\"", "only_unseen"),
    ] {
        let refused = check_config(dir.path(), &config(account, ""));
        assert!(!refused.status.success(), "{account}: {}", describe(&refused));
        assert!(describe(&refused).contains(why), "{why}: {}", describe(&refused));
    }
    // The policy × backend table: JMAP archives to its role-archive mailbox
    // and flags with a keyword; a named archive folder is refused with the
    // reason, on the account and on a device.
    let jmap = |account_policy: &str, device_policy: &str| {
        config(account_policy, device_policy).replace(
            "kind = \"imap\"\nhost = \"127.0.0.1\"\nport = 143\ntls = \"none\"",
            "kind = \"jmap\"\nurl = \"http://127.0.0.1:9/jmap/session\"",
        )
    };
    for fine in [
        "[account.policy]\non_delete = \"trash\"",
        "[account.policy]\non_delete = \"archive\"",
        "[account.policy]\non_delete = \"flag\"\nonly_unseen = true\nattachment_types = [\"application/pdf\", \"image/*\"]",
    ] {
        let checked = check_config(dir.path(), &jmap(fine, ""));
        assert!(checked.status.success(), "{fine}: {}", describe(&checked));
    }
    for (account, device, why) in [
        (
            "[account.policy]\non_delete = \"archive\"\narchive_folder = \"Done\"",
            "",
            "on_delete = \"archive\" is not supported by the jmap backend: archive_folder is not built here",
        ),
        (
            "",
            "[account.device.policy]\non_delete = \"archive\"\narchive_folder = \"Done\"",
            "device `printer`: policy.on_delete = \"archive\" is not supported by the jmap backend",
        ),
    ] {
        let refused = check_config(dir.path(), &jmap(account, device));
        assert!(!refused.status.success(), "{account} {device}: {}", describe(&refused));
        let text = describe(&refused).replace("\\\"", "\"");
        assert!(text.contains(why), "{why}: {text}");
    }
}

/// The recipes of docs/POLICIES.md are configurations check-config accepts
/// (in front of an IMAP backend, with real password hashes and files).
#[test]
fn the_documented_recipes_pass_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let hash = hash_password("pw").unwrap();
    let docs = include_str!("../docs/POLICIES.md");
    let recipes: Vec<&str> = docs.split("```toml\n").skip(1).map(|block| block.split("```").next().unwrap()).collect();
    assert_eq!(recipes.len(), 3, "three recipes");
    for recipe in recipes {
        let mut text = String::from("[backend]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = 143\ntls = \"none\"\n");
        for line in recipe.lines() {
            let line = match line.split_once("password_file = ") {
                Some((key, path)) => {
                    let name = path.trim_matches('"').rsplit('/').next().unwrap().to_string();
                    std::fs::write(dir.path().join(&name), "x\n").unwrap();
                    format!("{key}password_file = \"{}\"", dir.path().join(name).display())
                }
                None if line.starts_with("password_hash") => format!("password_hash = \"{hash}\""),
                None => line.to_string(),
            };
            text.push_str(&line);
            text.push('\n');
        }
        let checked = check_config(dir.path(), &text);
        assert!(checked.status.success(), "{text}\n{}", describe(&checked));
    }
}

// --- Sharing (each_device_once), CAPA and LOGIN-DELAY ------------------------

const PRINTER_PASSWORD: &str = "pw-printer";

/// The "three printers sharing one mailbox" recipe of docs/POLICIES.md, in
/// front of Dovecot (alice's mailbox): the recipe's own lines, with the
/// login, password file and records file made real. `state`: a `[state]`
/// table to add (the records then live there).
fn three_printers_config(dovecot: &Dovecot, dir: &Path, state: Option<&str>) -> PathBuf {
    let docs = include_str!("../docs/POLICIES.md");
    let recipe = docs
        .split("### Three printers sharing one mailbox")
        .nth(1)
        .and_then(|rest| rest.split("```toml\n").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("the recipe's TOML block");
    assert!(recipe.contains("sharing = \"each_device_once\""), "the recipe uses each_device_once:\n{recipe}");
    std::fs::write(dir.join("printers-password"), format!("{}\n", ALICE.1)).unwrap();
    let hash = hash_password(PRINTER_PASSWORD).unwrap();
    let mut text = format!(
        "[backend]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n\n{}\n",
        dovecot.imap_port,
        state.unwrap_or("")
    );
    for line in recipe.lines() {
        let line = if line.starts_with("login = ") {
            format!("login = \"{}\"", ALICE.0)
        } else if line.starts_with("password_file = ") {
            format!("password_file = \"{}\"", dir.join("printers-password").display())
        } else if line.starts_with("records_file = ") {
            format!("records_file = \"{}\"", dir.join("device-records.json").display())
        } else if line.starts_with("password_hash") {
            format!("password_hash = \"{hash}\"")
        } else {
            line.to_string()
        };
        text.push_str(&line);
        text.push('\n');
    }
    let path = dir.join("popgate.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("the recipe's configuration: {e}"));
    path
}

fn office_invoice(n: u32) -> Vec<u8> {
    from("Office <clerk@office.example>", &format!("office invoice {n}"))
}

/// Logs `printer` in, retrieves every message shown, optionally DELEs them
/// all, QUITs; returns the messages' contents, sorted.
fn print_everything(addr: std::net::SocketAddr, printer: &str, delete: bool) -> Vec<Vec<u8>> {
    let mut c = Pop3::login(addr, printer, PRINTER_PASSWORD);
    let (count, _) = c.stat();
    let mut printed: Vec<Vec<u8>> = (1..=count as u32).map(|n| c.retr(n)).collect();
    if delete {
        for n in 1..=count {
            c.ok(&format!("DELE {n}"));
        }
    }
    assert!(c.quit().starts_with("+OK"), "{printer}: QUIT");
    printed.sort();
    printed
}

fn sorted(mut messages: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    messages.sort();
    messages
}

/// The recipe, run: three printers on one Dovecot mailbox each print each
/// office message once — across a restart of popgate (the records are in
/// the file) — spam is never shown, and a message leaves the mailbox only
/// when the last printer has had it and DELE'd it.
#[test]
fn the_three_printers_recipe_prints_each_message_once_on_each_printer() {
    let dovecot = Dovecot::start();
    dovecot.append_all(ALICE.0, &[office_invoice(1), spam(), office_invoice(2)]);
    let dir = tempfile::tempdir().unwrap();
    let config = three_printers_config(&dovecot, dir.path(), None);
    let want = sorted(vec![canonical(&office_invoice(1)), canonical(&office_invoice(2))]);

    let mut gateway = GatewayProcess::start(&["--config", config.to_str().unwrap()]);
    let mut a = Pop3::login(gateway.addr, "printer-a", PRINTER_PASSWORD);
    assert!(a.capa().iter().any(|c| c == "EXPIRE 0"), "each_device_once: EXPIRE 0 after login");
    assert!(a.quit().starts_with("+OK"));
    assert_eq!(print_everything(gateway.addr, "printer-a", false), want, "printer-a");
    assert_eq!(print_everything(gateway.addr, "printer-b", true), want, "printer-b");
    assert_eq!(dovecot.messages(ALICE.0).len(), 3, "printer-c has not had them: nothing removed");
    gateway.terminate();
    assert!(gateway.wait(std::time::Duration::from_secs(30)).success(), "{}", gateway.log());

    let gateway = GatewayProcess::start(&["--config", config.to_str().unwrap()]);
    for printer in ["printer-a", "printer-b"] {
        assert_eq!(print_everything(gateway.addr, printer, true), Vec::<Vec<u8>>::new(), "{printer} after the restart");
    }
    assert_eq!(dovecot.messages(ALICE.0).len(), 3, "still nothing removed");
    assert_eq!(print_everything(gateway.addr, "printer-c", true), want, "printer-c");
    assert_eq!(dovecot.messages(ALICE.0).len(), 1, "the last printer's DELE removed what all had; spam stays");
    for printer in ["printer-a", "printer-b", "printer-c"] {
        assert_eq!(print_everything(gateway.addr, printer, false), Vec::<Vec<u8>>::new(), "{printer} at the end");
    }
    use std::os::unix::fs::PermissionsExt;
    let records = dir.path().join("device-records.json");
    assert_eq!(std::fs::metadata(&records).unwrap().permissions().mode() & 0o777, 0o600);
    let text = std::fs::read_to_string(&records).unwrap();
    assert!(!text.contains("office.example") && !text.contains("invoice"), "no addresses or content: {text}");
}

/// With `[state] url`, two replicas share the devices' records: what a
/// printer had through one replica is not shown to it through the other.
#[test]
fn each_device_once_records_are_shared_by_replicas_through_redis() {
    let redis = support::redis::Redis::start();
    let dovecot = Dovecot::start();
    dovecot.append_all(ALICE.0, &[office_invoice(1), office_invoice(2)]);
    let dir = tempfile::tempdir().unwrap();
    let state = format!("[state]\nurl = \"{}\"\n", redis.url());
    let config = three_printers_config(&dovecot, dir.path(), Some(&state));
    let want = sorted(vec![canonical(&office_invoice(1)), canonical(&office_invoice(2))]);
    let one = GatewayProcess::start(&["--config", config.to_str().unwrap()]);
    let two = GatewayProcess::start(&["--config", config.to_str().unwrap()]);
    assert_eq!(print_everything(one.addr, "printer-a", true), want, "printer-a through replica one");
    assert_eq!(print_everything(two.addr, "printer-a", true), Vec::<Vec<u8>>::new(), "printer-a through replica two");
    assert_eq!(print_everything(two.addr, "printer-b", true), want, "printer-b through replica two");
    assert_eq!(print_everything(one.addr, "printer-b", true), Vec::<Vec<u8>>::new(), "printer-b through replica one");
    assert_eq!(dovecot.messages(ALICE.0).len(), 2, "printer-c has not had them");
    assert_eq!(print_everything(one.addr, "printer-c", true), want, "printer-c");
    assert!(dovecot.messages(ALICE.0).is_empty(), "gone once all three had them");
    assert!(!dir.path().join("device-records.json").exists(), "the records are in Redis, not in the file");
    assert!(redis.command(&["--scan", "--pattern", "*seen:*"]).contains("seen:"), "no record in Redis");
}

/// RFC 2449 CAPA before and after login for a `keep` device and an
/// `expunge` device, and LOGIN-DELAY enforced: a second immediate login of
/// a device with `login_delay_secs` is refused with `[LOGIN-DELAY]` (its
/// password checked first), while a device without one logs in again.
#[test]
fn capa_is_per_user_and_login_delay_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    std::fs::create_dir(&demo).unwrap();
    std::fs::write(demo.join("01-office.eml"), office()).unwrap();
    std::fs::write(dir.path().join("desk-password"), "anything\n").unwrap();
    let config = dir.path().join("popgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[backend]
kind = "demo"
messages_dir = "{demo}"

[[account]]
name = "desk"
mode = "mapped"
login = "desk"
password_file = "{dir}/desk-password"

[[account.device]]
user = "keeper"
password_hash = "{hash}"

[account.device.policy]
on_delete = "keep"

[[account.device]]
user = "remover"
password_hash = "{hash}"

[account.device.policy]
on_delete = "expunge"
login_delay_secs = 3600
"#,
            demo = demo.display(),
            dir = dir.path().display(),
            hash = hash_password(PRINTER_PASSWORD).unwrap(),
        ),
    )
    .unwrap();
    let gateway = GatewayProcess::start(&["--config", config.to_str().unwrap()]);
    let mut c = Pop3::connect(gateway.addr);
    let before = c.capa();
    for want in ["EXPIRE NEVER USER", "LOGIN-DELAY 0 USER"] {
        assert!(before.iter().any(|l| l == want), "before login: {want} in {before:?}");
    }
    c.user_pass("keeper", PRINTER_PASSWORD);
    let after = c.capa();
    for want in ["EXPIRE NEVER", "LOGIN-DELAY 0"] {
        assert!(after.iter().any(|l| l == want), "keeper: {want} in {after:?}");
    }
    assert!(!after.iter().any(|l| l.ends_with(" USER")), "{after:?}");
    assert!(c.quit().starts_with("+OK"));

    let mut refused = 0;
    let mut logged_in = 0;
    for attempt in 0..3 {
        let mut c = Pop3::connect(gateway.addr);
        c.ok("USER remover");
        let reply = c.cmd(&format!("PASS {PRINTER_PASSWORD}"));
        if reply.starts_with("+OK") {
            logged_in += 1;
            let after = c.capa();
            for want in ["EXPIRE NEVER", "LOGIN-DELAY 3600"] {
                assert!(after.iter().any(|l| l == want), "remover: {want} in {after:?}");
            }
            assert!(c.quit().starts_with("+OK"));
        } else {
            assert!(reply.starts_with("-ERR [LOGIN-DELAY]"), "attempt {attempt}: {reply}");
            refused += 1;
            // A wrong password is still a wrong password.
            c.ok("USER remover");
            assert!(c.cmd("PASS wrong").starts_with("-ERR [AUTH]"));
        }
    }
    assert_eq!((logged_in, refused), (1, 2), "one login within the delay, then [LOGIN-DELAY]");
    for _ in 0..2 {
        let mut c = Pop3::login(gateway.addr, "keeper", PRINTER_PASSWORD);
        assert!(c.quit().starts_with("+OK"), "a device without a delay logs in again");
    }
}

/// check-config on `sharing`: account only, mapped accounts only, with
/// somewhere to keep the records; `login_delay_secs` bounded.
#[test]
fn check_config_refuses_sharing_where_it_makes_no_sense() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "x\n").unwrap();
    let hash = hash_password("pw").unwrap();
    let backend = "[backend]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = 143\ntls = \"none\"\n";
    let mapped = |account_policy: &str, device_policy: &str| {
        format!(
            "{backend}\n[[account]]\nname = \"office\"\nmode = \"mapped\"\nlogin = \"alice\"\n\
             password_file = \"{dir}/pw\"\n{account_policy}\n\n[[account.device]]\nuser = \"printer\"\n\
             password_hash = \"{hash}\"\n{device_policy}\n",
            dir = dir.path().display()
        )
    };
    let records = format!("records_file = \"{}/records.json\"", dir.path().display());
    let fine = check_config(
        dir.path(),
        &mapped(
            &format!("[account.policy]\nsharing = \"each_device_once\"\n{records}"),
            "[account.device.policy]\nlogin_delay_secs = 600",
        ),
    );
    assert!(fine.status.success(), "{}", describe(&fine));
    let passthrough = format!(
        "{backend}\n[[account]]\nname = \"people\"\nmode = \"passthrough\"\nusers = [\"*\"]\n\n\
         [account.policy]\nsharing = \"each_device_once\"\n{records}\n"
    );
    for (text, why) in [
        (mapped("[account.policy]\nsharing = \"each_device_once\"", ""), "needs somewhere to keep the device records"),
        (
            mapped("", "[account.device.policy]\nsharing = \"each_device_once\""),
            "sharing and records_file are set per account",
        ),
        (mapped("[account.policy]\nlogin_delay_secs = 86401", ""), "login_delay_secs: 0 to 86400"),
        (mapped("[account.policy]\nsharing = \"everyone\"", ""), "unknown variant `everyone`"),
        (passthrough, "needs a mapped account"),
    ] {
        let refused = check_config(dir.path(), &text);
        assert!(!refused.status.success(), "{text}: {}", describe(&refused));
        let shown = describe(&refused);
        assert!(shown.contains(why), "{why}: {shown}");
    }
}

// --- Filters through a real `popgate serve`: DMARC, attachment types, the
// documented recipes run as they are written -------------------------------

const AUTHSERV_ID: &str = "mx.example.net";

/// A message from `from_address`, with a PDF (or a text) attachment, and
/// the provider's `Authentication-Results` stamp when `stamp` names what it
/// says (`dmarc=pass header.from=office.example`).
fn office_mail(subject: &str, from_address: &str, stamp: Option<&str>, attachment: &str) -> Vec<u8> {
    let stamp = stamp.map(|s| format!("Authentication-Results: {s}\r\n")).unwrap_or_default();
    format!(
        "{stamp}From: Clerk <{from_address}>\r\nTo: print@example.com\r\nSubject: {subject}\r\n\
         Message-ID: <{id}@office.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nPlease print {subject}.\r\n\
         --b1\r\nContent-Type: {attachment}; name=\"doc\"\r\nContent-Disposition: attachment; filename=\"doc\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQKJcOkw7zDtsOf\r\n--b1--\r\n",
        id = subject.replace(' ', "-")
    )
    .into_bytes()
}

fn dmarc_pass(domain: &str) -> String {
    format!("{AUTHSERV_ID}; spf=pass smtp.mailfrom={domain}; dmarc=pass (p=REJECT) header.from={domain}")
}

/// The ```toml recipe of docs/POLICIES.md under `title`, made to run here:
/// its backend is this Dovecot, its login alice, its password file hers
/// and its devices' password hashes `device_password`'s. Every policy key
/// is kept exactly as documented.
fn recipe(title: &str, dovecot: &Dovecot, dir: &Path, device_password: &str) -> PathBuf {
    let docs = include_str!("../docs/POLICIES.md");
    let section = docs.split(&format!("### {title}\n")).nth(1).unwrap_or_else(|| panic!("no recipe {title:?}"));
    let block = section.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).expect("a toml block");
    let mut text =
        format!("[backend]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {}\ntls = \"none\"\n", dovecot.imap_port);
    let hash = hash_password(device_password).unwrap();
    for line in block.lines() {
        let line = if line.starts_with("password_file = ") {
            let path = dir.join("alice-password");
            std::fs::write(&path, format!("{}\n", ALICE.1)).unwrap();
            format!("password_file = \"{}\"", path.display())
        } else if line.starts_with("login = ") {
            format!("login = \"{}\"", ALICE.0)
        } else if line.starts_with("password_hash") {
            format!("password_hash = \"{hash}\"")
        } else {
            line.to_string()
        };
        text.push_str(&line);
        text.push('\n');
    }
    let path = dir.join(format!("{}.toml", title.len()));
    std::fs::write(&path, &text).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("recipe {title:?}: {e}\n{text}"));
    path
}

/// `require_dmarc_pass` end to end: a spoofed From without the provider's
/// stamp, and one whose pass is stamped by someone else, are hidden; the
/// stamped one is shown; nothing hidden is touched.
#[test]
fn dovecot_dmarc_hides_the_spoofed_from_and_shows_the_stamped_one() {
    let dovecot = Dovecot::start();
    let raws = [
        office_mail("stamped", "clerk@office.example", Some(&dmarc_pass("office.example")), "application/pdf"),
        office_mail("spoofed", "clerk@office.example", None, "application/pdf"),
        office_mail(
            "stamped by the sender",
            "clerk@office.example",
            Some("evil.example; dmarc=pass header.from=office.example"),
            "application/pdf",
        ),
        office_mail(
            "failed",
            "clerk@office.example",
            Some(&format!("{AUTHSERV_ID}; dmarc=fail header.from=office.example")),
            "application/pdf",
        ),
    ];
    let uids = dovecot.append_all(ALICE.0, &raws);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("alice-password"), format!("{}\n", ALICE.1)).unwrap();
    let config = dir.path().join("popgate.toml");
    std::fs::write(
        &config,
        format!(
            "[backend]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = {port}\ntls = \"none\"\n\n\
             [[account]]\nname = \"print\"\nmode = \"mapped\"\nlogin = \"{user}\"\npassword_file = \"{dir}/alice-password\"\n\n\
             [account.policy]\nrequire_dmarc_pass = true\nauthserv_id = \"{AUTHSERV_ID}\"\n\n\
             [[account.device]]\nuser = \"{p1}\"\npassword_hash = \"{h1}\"\n",
            port = dovecot.imap_port,
            user = ALICE.0,
            dir = dir.path().display(),
            p1 = PRINTER_1.0,
            h1 = hash_password(PRINTER_1.1).unwrap(),
        ),
    )
    .unwrap();
    let gateway = GatewayProcess::start(&["--config", config.to_str().unwrap()]);
    let mut pop = Pop3::login(gateway.addr, PRINTER_1.0, PRINTER_1.1);
    let shown = canonical(&raws[0]);
    assert_eq!(pop.ok("STAT"), format!("+OK 1 {}", shown.len()), "only the stamped message");
    assert_eq!(pop.retr(1), shown);
    pop.err("RETR 2");
    assert!(pop.ok("QUIT").starts_with("+OK"));
    assert_eq!(dovecot.uids(ALICE.0), uids, "nothing removed");
    let log = gateway.log();
    assert!(log.contains("messages hidden by the device policy"), "{log}");
}

/// The recipe "a printer that prints only PDFs from the office domain",
/// exactly as documented, as a live session on Dovecot: only the office's
/// stamped mail with a PDF is printed; its DELE moves exactly it to the
/// trash (`on_delete = "trash"`); the rest stays in the inbox.
#[test]
fn recipe_printer_prints_only_pdfs_from_the_office_domain() {
    let dovecot = Dovecot::start();
    let raws = [
        office_mail("invoice pdf", "clerk@office.example", Some(&dmarc_pass("office.example")), "application/pdf"),
        office_mail("letter docx", "clerk@office.example", Some(&dmarc_pass("office.example")), "application/msword"),
        office_mail("spoofed pdf", "clerk@office.example", None, "application/pdf"),
        office_mail("partner pdf", "orders@partner.example", Some(&dmarc_pass("partner.example")), "application/pdf"),
        office_mail("report pdf", "boss@office.example", Some(&dmarc_pass("office.example")), "Application/PDF"),
    ];
    let uids = dovecot.append_all(ALICE.0, &raws);
    let dir = tempfile::tempdir().unwrap();
    // The deployment's trash: Dovecot marks it \Trash (RFC 6154) once it exists.
    let mut imap = dovecot.imap(ALICE.0);
    imap.ok("CREATE Trash");
    imap.logout();
    let config = recipe("A printer that prints only PDFs from the office domain", &dovecot, dir.path(), "pw-printer");
    let gateway = GatewayProcess::start(&["--config", config.to_str().unwrap()]);
    let mut pop = Pop3::login(gateway.addr, "printer-3rd-floor", "pw-printer");
    let shown = [canonical(&raws[0]), canonical(&raws[4])];
    assert_eq!(pop.ok("STAT"), format!("+OK 2 {}", shown[0].len() + shown[1].len()));
    assert_eq!(pop.retr(1), shown[0]);
    assert_eq!(pop.retr(2), shown[1]);
    pop.ok("DELE 1");
    pop.ok("DELE 2");
    assert!(pop.ok("QUIT").contains("(2 messages deleted)"));
    assert_eq!(dovecot.uids(ALICE.0), vec![uids[1], uids[2], uids[3]], "the hidden ones stay in the inbox");
    let trashed = dovecot.imap(ALICE.0).ok("STATUS Trash (MESSAGES)");
    assert!(format!("{trashed:?}").contains("MESSAGES 2"), "the trash holds the two printed: {trashed:?}");
    let mut again = Pop3::login(gateway.addr, "printer-3rd-floor", "pw-printer");
    assert_eq!(again.ok("STAT"), "+OK 0 0");
    again.ok("QUIT");
}

/// The recipe "a scanner inbox that archives instead of deleting", exactly
/// as documented, as a live session on Dovecot: the importer's DELE moves
/// exactly the retrieved scans to `Scans/Done`; nothing is expunged.
#[test]
fn recipe_scanner_inbox_archives_instead_of_deleting() {
    let dovecot = Dovecot::start();
    let raws = [
        office_mail("scan one", "scanner@office.example", None, "application/pdf"),
        office_mail("scan two", "scanner@office.example", None, "image/png"),
        office_mail("scan three", "scanner@office.example", None, "application/pdf"),
    ];
    let uids = dovecot.append_all(ALICE.0, &raws);
    let mut imap = dovecot.imap(ALICE.0);
    // Dovecot's hierarchy separator is ".": the folder "Scans/Done" of the
    // recipe is found as INBOX.Scans.Done (popgate's named-folder lookup).
    imap.ok("CREATE INBOX.Scans.Done");
    imap.logout();
    let dir = tempfile::tempdir().unwrap();
    let config = recipe("A scanner inbox that archives instead of deleting", &dovecot, dir.path(), "pw-importer");
    let gateway = GatewayProcess::start(&["--config", config.to_str().unwrap()]);
    let mut pop = Pop3::login(gateway.addr, "document-importer", "pw-importer");
    assert_eq!(pop.ok("STAT"), format!("+OK 3 {}", raws.iter().map(|r| canonical(r).len()).sum::<usize>()));
    assert_eq!(pop.retr(1), canonical(&raws[0]));
    assert_eq!(pop.retr(3), canonical(&raws[2]));
    pop.ok("DELE 1");
    pop.ok("DELE 3");
    assert!(pop.ok("QUIT").contains("(2 messages deleted)"));
    assert_eq!(dovecot.uids(ALICE.0), vec![uids[1]], "only the unretrieved scan stays in the inbox");
    let done = dovecot.imap(ALICE.0).ok("STATUS INBOX.Scans.Done (MESSAGES)");
    assert!(format!("{done:?}").contains("MESSAGES 2"), "Scans/Done holds the two archived: {done:?}");
}

/// `oversize = "notice"` needs `max_size_bytes` (set on the account or the
/// device: the merged policy is checked), and says so; `hide` and `notice`
/// with a limit pass; an unknown word is refused.
#[test]
fn check_config_refuses_an_oversize_notice_without_a_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pw"), "x\n").unwrap();
    let hash = hash_password("pw").unwrap();
    let backend = "[backend]\nkind = \"imap\"\nhost = \"127.0.0.1\"\nport = 143\ntls = \"none\"\n";
    let mapped = |account_policy: &str, device_policy: &str| {
        format!(
            "{backend}\n[[account]]\nname = \"office\"\nmode = \"mapped\"\nlogin = \"alice\"\n\
             password_file = \"{dir}/pw\"\n{account_policy}\n\n[[account.device]]\nuser = \"printer\"\n\
             password_hash = \"{hash}\"\n{device_policy}\n",
            dir = dir.path().display()
        )
    };
    for text in [
        mapped("[account.policy]\nmax_size_bytes = 1000000\noversize = \"notice\"", ""),
        mapped("[account.policy]\nmax_size_bytes = 1000000", "[account.device.policy]\noversize = \"notice\""),
        mapped("[account.policy]\noversize = \"hide\"", ""),
    ] {
        let fine = check_config(dir.path(), &text);
        assert!(fine.status.success(), "{text}: {}", describe(&fine));
    }
    for (text, why) in [
        (
            mapped("[account.policy]\noversize = \"notice\"", ""),
            "oversize = \"notice\" needs max_size_bytes: it says which messages are too large",
        ),
        (mapped("", "[account.device.policy]\noversize = \"notice\""), "oversize = \"notice\" needs max_size_bytes"),
        (mapped("[account.policy]\nmax_size_bytes = 1000\noversize = \"bounce\"", ""), "unknown variant `bounce`"),
    ] {
        let refused = check_config(dir.path(), &text);
        assert!(!refused.status.success(), "{text}: {}", describe(&refused));
        let shown = describe(&refused);
        assert!(shown.contains(why), "{why}: {shown}");
    }
}
