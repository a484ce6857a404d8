//! The command line: parse, load the config, set up logging, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use chrono::{DateTime, Utc};
use clap::{CommandFactory, Parser, Subcommand};

use cruddur_syncd::config::{self, LoadedConfig};
use cruddur_syncd::error::{Error, EXIT_CONFIG, EXIT_FAILURE, EXIT_UNAVAILABLE};
use cruddur_syncd::store::Store;
use cruddur_syncd::tools::{self, JsonLines};
use cruddur_syncd::{aws, check, daemon, logging, reconcile};

// The API's request path makes many small, short-lived allocations, which glibc's malloc serves
// markedly slower (docs/benchmarks.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cruddur-syncd", version = cruddur_syncd::version::LONG, about = "Cache-sync daemon and operator tools for Cruddur messaging")]
struct Cli {
    /// Config file [default: $CRUDDUR_SYNCD_CONFIG, else /etc/cruddur-syncd/config.toml]
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default)
    Run,
    /// Print the effective config and probe every dependency
    Check,
    /// The DynamoDB messages table
    #[command(subcommand)]
    Ddb(Ddb),
    /// The PostgreSQL users table
    #[command(subcommand)]
    Db(Db),
    /// The Cognito user pool
    #[command(subcommand)]
    Cognito(Cognito),
    /// Map Cognito subs into users.cognito_user_id now, and print the report
    Reconcile {
        /// Compute the report without writing anything
        #[arg(long)]
        dry_run: bool,
        /// Print the report as one JSON object
        #[arg(long)]
        json: bool,
    },
    /// Print shell completions (reads no config)
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the man page, roff (reads no config)
    Man,
}

#[derive(Subcommand)]
enum Ddb {
    /// Create the table, GSI and stream (idempotent; waits until ACTIVE)
    SchemaLoad,
    /// Delete the table
    Drop {
        #[arg(long)]
        yes: bool,
    },
    /// List table names at the endpoint
    ListTables,
    /// Every item, one JSON object per line
    Scan {
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Write the demo conversation (deterministic ids; re-running adds nothing)
    Seed {
        /// Time of the newest demo message (RFC 3339) [default: now]
        #[arg(long, value_parser = parse_rfc3339)]
        now: Option<DateTime<Utc>>,
    },
    /// The newest messages of a conversation, oldest first
    GetConversation {
        group_uuid: String,
        #[arg(long)]
        limit: Option<usize>,
    },
    /// A user's conversations, newest first (the handle is looked up in PostgreSQL)
    ListConversations { handle: String },
    /// Recompute every conversation row from the messages (prints the plan; --apply writes it)
    RepairGroups {
        /// Write the fixes (without it nothing is written)
        #[arg(long)]
        apply: bool,
    },
}

#[derive(Subcommand)]
enum Db {
    /// Create the database if missing and the app's users table (idempotent)
    SchemaLoad,
    /// Insert the demo users (idempotent)
    Seed,
}

#[derive(Subcommand)]
enum Cognito {
    /// Every user of the pool, one JSON object per line
    ListUsers,
    /// Local emulator only: create the pool, app client and demo users
    Seed,
    /// Local emulator only: print a token for a user (for curl against the API)
    Token {
        username: String,
        #[arg(long, default_value = cruddur_syncd::demo::PASSWORD)]
        password: String,
    },
}

fn parse_rfc3339(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s).map(|d| d.with_timezone(&Utc)).map_err(|e| format!("not an RFC 3339 time: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // What describes the command line itself needs no config.
    match &cli.command {
        Some(Command::Completions { shell }) => {
            clap_complete::generate(*shell, &mut Cli::command(), "cruddur-syncd", &mut std::io::stdout());
            return ExitCode::SUCCESS;
        }
        Some(Command::Man) => {
            return match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cruddur-syncd: cannot write the man page: {e}");
                    ExitCode::from(EXIT_FAILURE)
                }
            };
        }
        _ => {}
    }
    let path = config::resolve_path(cli.config.as_deref());
    let loaded = match config::load(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("cruddur-syncd: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(note) = logging::init(&loaded.config.log) {
        tracing::warn!("{note}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cruddur-syncd: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = runtime.block_on(dispatch(cli.command.unwrap_or(Command::Run), loaded));
    // A task abandoned at shutdown (a hung call, a blocking DNS lookup) must not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(Error::OutputClosed) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cruddur-syncd: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

async fn dispatch(command: Command, loaded: LoadedConfig) -> Result<u8, Error> {
    let cfg = &loaded.config;
    let stdout = std::io::stdout();
    let mut out = JsonLines::new(std::io::BufWriter::new(stdout.lock()));
    let clients = aws::clients(&cfg.aws).await;
    let store = || Store::new(clients.dynamodb.clone(), cfg.dynamodb.table.clone(), clients.endpoints.dynamodb.clone());
    let cognito_ep = clients.endpoints.cognito.as_str();
    match command {
        // Answered in main, before any config is read.
        Command::Completions { .. } | Command::Man => return Ok(0),
        Command::Run => {
            drop(out);
            daemon::run(loaded).await?;
            return Ok(0);
        }
        Command::Check => {
            let probes = check::probes(&loaded, &clients).await;
            let mut w = std::io::stdout().lock();
            let all_ok =
                check::render(&loaded, &probes, &mut w).map_err(|e| Error::Failed(format!("cannot write: {e}")))?;
            return Ok(if all_ok { 0 } else { EXIT_UNAVAILABLE });
        }
        Command::Ddb(Ddb::SchemaLoad) => tools::ddb::schema_load(cfg, &store(), &mut out).await?,
        Command::Ddb(Ddb::Drop { yes }) => tools::ddb::drop(&store(), yes, &mut out).await?,
        Command::Ddb(Ddb::ListTables) => tools::ddb::list_tables(&store(), &mut out).await?,
        Command::Ddb(Ddb::Scan { limit }) => tools::ddb::scan(&store(), limit, &mut out).await?,
        Command::Ddb(Ddb::Seed { now }) => tools::ddb::seed(&store(), now.unwrap_or_else(Utc::now), &mut out).await?,
        Command::Ddb(Ddb::GetConversation { group_uuid, limit }) => {
            tools::ddb::get_conversation(&store(), &group_uuid, limit, &mut out).await?
        }
        Command::Ddb(Ddb::ListConversations { handle }) => {
            tools::ddb::list_conversations(cfg, &store(), &handle, &mut out).await?
        }
        Command::Ddb(Ddb::RepairGroups { apply }) => {
            tools::repair::repair_groups(&store(), &cfg.dynamodb.group_index, apply, &mut out).await?
        }
        Command::Db(Db::SchemaLoad) => tools::db::schema_load(&cfg.postgres, &mut out).await?,
        Command::Db(Db::Seed) => tools::db::seed(&cfg.postgres, &mut out).await?,
        Command::Cognito(Cognito::ListUsers) => {
            tools::cognito::list_users(cfg, &clients.cognito, cognito_ep, &mut out).await?
        }
        Command::Cognito(Cognito::Seed) => tools::cognito::seed(cfg, &clients.cognito, cognito_ep, &mut out).await?,
        Command::Cognito(Cognito::Token { username, password }) => {
            let token = tools::cognito::token(cfg, &clients.cognito, cognito_ep, &username, &password).await?;
            out.text(&token)?
        }
        Command::Reconcile { dry_run, json } => {
            let report = reconcile::run_once(cfg, &clients, dry_run).await?;
            if json {
                out.emit(&report)?;
                out.flush()?;
            } else {
                drop(out);
                let mut w = std::io::stdout().lock();
                report.write_text(&mut w).map_err(tools::output_error)?;
            }
            if report.status == reconcile::Status::Skipped {
                eprintln!(
                    "cruddur-syncd: reconcile skipped: another instance holds the reconcile lock on {}; nothing was done, run it again when that run has finished",
                    report.postgres
                );
                return Ok(EXIT_FAILURE);
            }
            return Ok(0);
        }
    }
    out.flush()?;
    Ok(0)
}
