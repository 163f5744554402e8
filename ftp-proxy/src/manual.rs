//! The manual: man pages and shell completions generated from the clap
//! definitions of [`crate::config::Cli`], so that they say what `--help`
//! says and cannot drift from it. The option lists come from clap; the
//! sections clap knows nothing of (the file, signals, exit status,
//! environment) are written here.
//!
//! Pure: bytes out. The binary's hidden `manual` command writes them to a
//! directory, and `cargo xtask package` installs them. Does not: choose
//! where they are installed (the package does), or explain every TOML key
//! (the example configuration does).

use clap::CommandFactory;
use clap_complete::{Generator, Shell};
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use crate::config::{Cli, EXIT_CONFIG};

/// The manual section: the gateway is a daemon an administrator runs
/// (as sshd(8) and vsftpd(8)).
pub const SECTION: &str = "8";

/// The shells completions are generated for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// The program's name, as installed.
const NAME: &str = "ftp-proxy";

/// One generated file.
#[derive(Debug)]
pub struct File {
    /// Its name, without a directory (`ftp-proxy.8`, `_ftp-proxy`…).
    pub name: String,
    /// Its contents.
    pub contents: Vec<u8>,
}

/// The man pages: `ftp-proxy.8` and one page per command
/// (`ftp-proxy-flows.8`…), which the main page's COMMANDS section names.
#[must_use]
pub fn man_pages() -> Vec<File> {
    // The `help` command is left out, as clap_mangen does: the pages are
    // the help.
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    let source = format!("{NAME} {}", env!("CARGO_PKG_VERSION"));
    let mut pages = Vec::new();
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        // The page's name is `ftp-proxy-flows`; its synopsis says how the
        // command is typed, `ftp-proxy flows`.
        let sub = sub
            .clone()
            .display_name(format!("{NAME}-{}", sub.get_name()))
            .bin_name(format!("{NAME} {}", sub.get_name()));
        let man = Man::new(sub).section(SECTION).source(source.clone());
        let mut contents = Vec::new();
        render_page(&man, &mut contents, false);
        pages.push(File {
            name: man.get_filename(),
            contents,
        });
    }
    let man = Man::new(command).section(SECTION).source(source);
    let mut contents = Vec::new();
    render_page(&man, &mut contents, true);
    pages.insert(
        0,
        File {
            name: man.get_filename(),
            contents,
        },
    );
    pages
}

/// The completion script for `shell`, under the name the shell's own
/// convention gives it (`ftp-proxy.bash`, `_ftp-proxy`, `ftp-proxy.fish`).
#[must_use]
pub fn completion(shell: Shell) -> File {
    let mut command = Cli::command();
    let mut contents = Vec::new();
    clap_complete::generate(shell, &mut command, NAME, &mut contents);
    File {
        name: shell.file_name(NAME),
        contents,
    }
}

/// clap_mangen's sections, then ours (text is given plain: roff escapes
/// dashes and backslashes) on the main page. Writing to a `Vec`
/// cannot fail, so the `io::Result`s are dropped.
fn render_page(man: &Man, out: &mut Vec<u8>, main: bool) {
    let _ = man.render_title(out);
    let _ = man.render_name_section(out);
    let _ = man.render_synopsis_section(out);
    let _ = man.render_description_section(out);
    let _ = man.render_options_section(out);
    if main {
        let _ = man.render_subcommands_section(out);
        let _ = extra_sections().to_writer(out);
    } else {
        let mut roff = Roff::new();
        roff.control("SH", ["SEE ALSO"]);
        roff.text([bold(NAME), roman(format!("({SECTION})"))]);
        let _ = roff.to_writer(out);
    }
}

/// What clap does not know: the file, signals, exit status, environment,
/// files. Kept short; the README has the long form.
fn extra_sections() -> Roff {
    let mut roff = Roff::new();
    roff.control("SH", ["CONFIGURATION FILE"]);
    roff.text([
        roman("Every option can be given in the TOML file named by "),
        bold("--config"),
        roman(", under its long name without the leading dashes (for example "),
        bold("upstream = \"ftp.example.net:21\""),
        roman(
            "); an option given on the command line wins over the file. \
               Unknown keys are refused. The pool of servers (",
        ),
        bold("[[servers]]"),
        roman("), their health checks ("),
        bold("[health]"),
        roman(") and the routes by user name ("),
        bold("[[routes]]"),
        roman(") can only be given in the file. The installed example, "),
        italic("/etc/ftp-proxy/ftp-proxy.toml"),
        roman(", explains every key and its default."),
    ]);
    roff.control("SH", ["SIGNALS"]);
    for (signal, meaning) in [
        (
            "SIGTERM",
            "Stop accepting; idle sessions get 421 and close, running transfers may finish \
             for up to --drain-timeout seconds, then the process exits 0. \
             A second SIGTERM exits at once.",
        ),
        ("SIGINT", "Exit at once."),
        (
            "SIGHUP",
            "Read the configuration file again: new sessions use it, running sessions keep \
             theirs. An invalid file is refused and the running configuration kept. Listen \
             addresses change only at a restart.",
        ),
    ] {
        roff.control("TP", []);
        roff.text([bold(signal)]);
        roff.text([roman(meaning)]);
    }
    roff.control("PP", []);
    roff.text([roman(
        "Under systemd (Type=notify) the gateway reports READY=1, RELOADING=1 and STOPPING=1.",
    )]);
    roff.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in [
        (
            "0".to_owned(),
            "After a drain, a valid --check-config, or SIGINT.",
        ),
        (
            EXIT_CONFIG.to_string(),
            "A configuration error (the message names the key), before anything is bound.",
        ),
        (
            "1".to_owned(),
            "Any other failure, for example a listener that cannot be bound.",
        ),
    ] {
        roff.control("TP", []);
        roff.text([bold(code)]);
        roff.text([roman(meaning)]);
    }
    roff.control("SH", ["ENVIRONMENT"]);
    roff.control("TP", []);
    roff.text([bold("FTP_PROXY_LOG")]);
    roff.text([roman(
        "The log filter (tracing's EnvFilter syntax) when --log-level is not given.",
    )]);
    roff.control("SH", ["FILES"]);
    for (file, meaning) in [
        (
            "/etc/ftp-proxy/ftp-proxy.toml",
            "The configuration the systemd unit starts the gateway with.",
        ),
        (
            "/lib/systemd/system/ftp-proxy.service",
            "The systemd unit: a transient user, four capabilities, a sandbox. Not enabled or \
             started when the package is installed: set upstream first, then systemctl \
             enable --now ftp-proxy.",
        ),
    ] {
        roff.control("TP", []);
        roff.text([italic(file)]);
        roff.text([roman(meaning)]);
    }
    roff.control("SH", ["SEE ALSO"]);
    roff.text([
        bold("systemctl"),
        roman("(1), "),
        bold("journalctl"),
        roman("(1), "),
        bold("systemd.service"),
        roman("(5)"),
    ]);
    roff
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;

    /// Every long option of the command line, help and version included.
    fn long_options(command: &clap::Command) -> Vec<String> {
        command
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long())
            .map(|long| format!("--{long}"))
            .collect()
    }

    #[test]
    fn the_man_page_has_every_option_and_command() {
        let pages = man_pages();
        let names: Vec<&str> = pages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "ftp-proxy.8",
                "ftp-proxy-check-config.8",
                "ftp-proxy-flows.8"
            ]
        );
        let main = String::from_utf8(pages[0].contents.clone()).unwrap();
        // roff writes a dash as \-.
        let main = main.replace("\\-", "-");
        let command = Cli::command();
        let options = long_options(&command);
        assert!(options.len() > 20, "{options:?}");
        for option in options {
            assert!(main.contains(&option), "ftp-proxy.8 lacks {option}");
        }
        for sub in ["ftp-proxy-check-config(8)", "ftp-proxy-flows(8)"] {
            assert!(main.contains(sub), "ftp-proxy.8 does not name {sub}");
        }
        for section in ["SIGNALS", "EXIT STATUS", "FILES", "SEE ALSO"] {
            assert!(
                main.contains(&format!(".SH \"{section}\""))
                    || main.contains(&format!(".SH {section}")),
                "{section}:\n{main}"
            );
        }
        let flows = String::from_utf8(pages[2].contents.clone()).unwrap();
        assert!(flows.replace("\\-", "-").contains("--from"), "{flows}");
    }

    #[test]
    fn every_completion_knows_every_option() {
        let options = long_options(&Cli::command());
        for shell in SHELLS {
            let file = completion(shell);
            let text = String::from_utf8(file.contents).unwrap();
            for option in &options {
                // fish names options without their dashes: `-l upstream`.
                let bare = option.trim_start_matches('-');
                assert!(
                    text.contains(option.as_str()) || text.contains(&format!("-l {bare}")),
                    "{shell}: {} lacks {option}",
                    file.name
                );
            }
            assert!(text.contains("flows"), "{shell}: no flows command");
            assert!(
                !text.contains("manual"),
                "{shell}: names the hidden command"
            );
        }
    }
}
