//! `service.name` for a process that names none itself, when its executable is a language
//! runtime (`java`, `python3.11`, `node`, `dotnet`, `ruby`): the executable says nothing about
//! which service it runs, so the name comes from what the command line runs, else from the
//! systemd unit that started it. Other executables (nginx, postgres) keep their own name.
//!
//! The rules, in order, first match wins:
//! - java: `-jar /opt/app/orders-1.2.jar` → `orders`; a main class `com.acme.Main` → `Main`
//!   (`-m module/com.acme.Main` too);
//! - python: `-m orders.server` → `orders`; a WSGI/ASGI runner (`gunicorn`, `uvicorn`,
//!   `hypercorn`, `daphne`, `waitress-serve`) → the top package of its `module:app` argument
//!   (`gunicorn orders.wsgi:app` → `orders`, `uvicorn main:app` → `main`); a script `app.py` →
//!   `app`;
//! - node: a script `server.js` → `server`;
//! - dotnet: `Orders.dll` → `Orders`;
//! - ruby: a script `app.rb` → `app`;
//! - then the systemd unit of its cgroup (`orders.service` → `orders`).

/// The runtime an executable name is, if it is one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Runtime {
    Java,
    Python,
    Node,
    Dotnet,
    Ruby,
}

fn runtime_of(exe_name: &str) -> Option<Runtime> {
    let name = exe_name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.');
    Some(match name {
        "java" => Runtime::Java,
        "python" | "pypy" => Runtime::Python,
        "node" | "nodejs" => Runtime::Node,
        "dotnet" => Runtime::Dotnet,
        "ruby" => Runtime::Ruby,
        _ => return None,
    })
}

/// Whether `exe_name` is a runtime whose name says nothing about the service.
pub fn is_runtime(exe_name: &str) -> bool {
    runtime_of(exe_name).is_some()
}

/// The name for a runtime process: its command line's, else its systemd unit's.
pub fn for_runtime(pid: u32, exe_name: &str) -> Option<String> {
    if !is_runtime(exe_name) {
        return None;
    }
    let argv = super::procfs::cmdline(pid);
    from_command_line(exe_name, &argv)
        .or_else(|| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok().and_then(|c| from_cgroup(&c)))
}

/// The name the command line gives (`argv[0]` first), for a runtime executable.
pub fn from_command_line(exe_name: &str, argv: &[String]) -> Option<String> {
    let args = argv.get(1..).unwrap_or_default();
    let name = match runtime_of(exe_name)? {
        Runtime::Java => java(args),
        Runtime::Python => python(args),
        Runtime::Node => {
            script(args, &["-r", "--require", "--import", "--loader", "-e", "--eval"], &[".js", ".mjs", ".cjs"])
        }
        Runtime::Dotnet => args.iter().find(|a| a.ends_with(".dll")).map(|a| stem(a, &[".dll"])),
        Runtime::Ruby => script(args, &["-r", "-I", "-e"], &[".rb"]),
    }?;
    (!name.is_empty()).then_some(name)
}

/// The systemd service a cgroup file (`/proc/PID/cgroup`, v1 or v2) places the process in.
pub fn from_cgroup(cgroup: &str) -> Option<String> {
    for line in cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if !(controllers.is_empty() || controllers == "name=systemd") {
            continue;
        }
        // The innermost service: user@1000.service holds a user's own units.
        let Some(unit) = path.split('/').rev().find(|c| c.ends_with(".service") && !c.starts_with("user@")) else {
            continue;
        };
        let name = unit.trim_end_matches(".service");
        let name = name.split('@').next().unwrap_or(name);
        if !name.is_empty() {
            return Some(name.to_string());
        }
    }
    None
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn stem(path: &str, suffixes: &[&str]) -> String {
    let name = file_name(path);
    suffixes.iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name).to_string()
}

/// The first argument that is not an option (skipping the values of `with_value` options).
fn first_operand<'a>(args: &'a [String], with_value: &[&str]) -> Option<&'a str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if with_value.contains(&a.as_str()) {
            it.next();
        } else if a == "--" {
            return it.next().map(String::as_str);
        } else if !a.starts_with('-') {
            return Some(a);
        }
    }
    None
}

fn script(args: &[String], with_value: &[&str], suffixes: &[&str]) -> Option<String> {
    first_operand(args, with_value).map(|s| stem(s, suffixes))
}

fn java(args: &[String]) -> Option<String> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-jar" => {
                let jar = stem(it.next()?, &[".jar"]);
                // orders-1.2.3 -> orders
                let base = match jar.find('-').filter(|&i| jar[i + 1..].starts_with(|c: char| c.is_ascii_digit())) {
                    Some(i) => jar[..i].to_string(),
                    None => jar,
                };
                return Some(base);
            }
            "-m" | "--module" => return it.next().map(|m| last_segment(m.rsplit('/').next().unwrap_or(m))),
            "-cp" | "-classpath" | "--class-path" | "-p" | "--module-path" | "--add-opens" | "--add-exports" => {
                it.next();
            }
            a if a.starts_with('-') => {}
            class => return Some(last_segment(class)),
        }
    }
    None
}

fn last_segment(class: &str) -> String {
    class.rsplit('.').next().unwrap_or(class).to_string()
}

/// Runners that serve a `module:app` argument.
const PYTHON_RUNNERS: [&str; 5] = ["gunicorn", "uvicorn", "hypercorn", "daphne", "waitress-serve"];

fn python(args: &[String]) -> Option<String> {
    let mut it = args.iter().enumerate();
    while let Some((i, a)) = it.next() {
        match a.as_str() {
            "-c" => return None,
            "-m" => {
                let module = it.next()?.1;
                let rest = &args[i + 2..];
                return Some(if PYTHON_RUNNERS.contains(&module.as_str()) {
                    runner_app(rest)?
                } else {
                    top_package(module)
                });
            }
            "-W" | "-X" | "--check-hash-based-pycs" => {
                it.next();
            }
            a if a.starts_with('-') => {}
            path => {
                let name = stem(path, &[".py"]);
                return Some(if PYTHON_RUNNERS.contains(&name.as_str()) { runner_app(&args[i + 1..])? } else { name });
            }
        }
    }
    None
}

/// `orders.wsgi:app` among a runner's arguments → `orders`.
fn runner_app(args: &[String]) -> Option<String> {
    let with_value = ["-b", "--bind", "-w", "--workers", "-k", "--worker-class", "--host", "--port", "-c", "--config"];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if with_value.contains(&a.as_str()) {
            it.next();
        } else if !a.starts_with('-') && a.contains(':') {
            return Some(top_package(a.split(':').next().unwrap_or(a)));
        }
    }
    None
}

fn top_package(module: &str) -> String {
    module.split('.').next().unwrap_or(module).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(exe: &str, cmd: &str) -> Option<String> {
        let argv: Vec<String> = cmd.split_whitespace().map(str::to_string).collect();
        from_command_line(exe, &argv)
    }

    #[test]
    fn runtimes_are_named_by_what_they_run() {
        assert_eq!(name("java", "java -Xmx1g -jar /opt/app/orders.jar --port 8080").as_deref(), Some("orders"));
        assert_eq!(name("java", "java -jar orders-1.2.3.jar").as_deref(), Some("orders"));
        assert_eq!(name("java", "java -cp /opt/lib/* -Dx=y com.acme.Main arg").as_deref(), Some("Main"));
        assert_eq!(name("java", "java -m shop/com.acme.shop.Server").as_deref(), Some("Server"));
        assert_eq!(name("python3.11", "python3 app.py 8080").as_deref(), Some("app"));
        assert_eq!(
            name("python3.11", "/usr/bin/python3 -u /srv/tests/http_server.py 80").as_deref(),
            Some("http_server")
        );
        assert_eq!(name("python3.11", "python -m orders.server --port 1").as_deref(), Some("orders"));
        assert_eq!(
            name("python3.11", "/usr/bin/python3 /usr/local/bin/gunicorn -w 4 -b :80 orders.wsgi:app").as_deref(),
            Some("orders")
        );
        assert_eq!(name("python3.12", "python3 -m uvicorn --host 0.0.0.0 main:app").as_deref(), Some("main"));
        assert_eq!(name("python3.11", "python3 -c print(1)"), None);
        assert_eq!(name("node", "node --require ./otel.js server.js").as_deref(), Some("server"));
        assert_eq!(name("node", "node /app/dist/index.mjs").as_deref(), Some("index"));
        assert_eq!(name("dotnet", "dotnet Orders.dll").as_deref(), Some("Orders"));
        assert_eq!(name("ruby", "ruby -Ilib app.rb").as_deref(), Some("app"));
        assert_eq!(name("nginx", "nginx: worker process"), None, "not a runtime");
        assert_eq!(name("java", "java"), None);
    }

    #[test]
    fn systemd_units_from_both_cgroup_versions() {
        assert_eq!(from_cgroup("0::/system.slice/orders.service\n").as_deref(), Some("orders"));
        assert_eq!(
            from_cgroup("12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/billing@2.service\n").as_deref(),
            Some("billing")
        );
        assert_eq!(
            from_cgroup("0::/user.slice/user-1000.slice/user@1000.service/app.slice/shop.service\n").as_deref(),
            Some("shop")
        );
        assert_eq!(from_cgroup("0::/user.slice/user-1000.slice/session-3.scope\n"), None);
        assert_eq!(from_cgroup("0::/\n"), None);
        assert_eq!(from_cgroup("0::/kubepods.slice/kubepods-pod1.slice/cri-containerd-ab.scope\n"), None);
    }
}
