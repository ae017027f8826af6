"""The `launcher` command: `serve`, and a client verb for every API call.

Client verbs find the launcher through --url / --data-dir, or LAUNCHER_URL / LAUNCHER_TOKEN. They print
tables for people and JSON with --json. On failure they print the ciao code and reason on stderr and exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from launcher.cli import fleet_cli
from launcher.cli.client import Client, ClientError
from launcher.core import config as config_module
from launcher.plugin.errors import SetupError

EXIT_FAILED = 1  # the launcher refused or failed the command
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.verb == "serve":
        return _serve(args)
    if args.verb == "hard-reset":
        return _hard_reset(args)
    if args.verb == "fleet":
        return fleet_cli.run(args)
    try:
        client = Client.discover(args.url, args.data_dir)
        args.run(client, args)
    except ClientError as exc:
        print(f"launcher: {exc.code}: {exc.reason}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, ValueError) as exc:
        print(f"launcher: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


def _serve(args: argparse.Namespace) -> int:
    import trio

    from launcher.cli.serve import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_module.load(args.config, data_dir=args.data_dir, virtualizer=args.virtualizer,
                                 listen=args.listen)
        trio.run(serve, cfg)
    except (SetupError, BaseExceptionGroup) as exc:
        return _report_setup_errors(exc)
    # Everything durable is flushed and closed; freeing a heap of 10 000 instances object by object would
    # only delay the exit that SIGTERM asked for (docs/concurrency.md: within 2 s).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _hard_reset(args: argparse.Namespace) -> int:
    import trio

    from launcher.cli.hard_reset import hard_reset

    if not args.yes:
        print("launcher: hard-reset destroys every VM of this data dir and forgets every instance; "
              "add --yes to do it", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_module.load(args.config, data_dir=args.data_dir, virtualizer=args.virtualizer)
        destroyed, removed = trio.run(hard_reset, cfg)
    except (SetupError, BaseExceptionGroup) as exc:
        return _report_setup_errors(exc)
    except OSError as exc:
        print(f"launcher: hard-reset: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"destroyed {len(destroyed)} VMs, removed {len(removed)} instances from {cfg.data_dir}")
    return 0


def _report_setup_errors(exc: SetupError | BaseExceptionGroup[BaseException]) -> int:
    """Print a set-up problem as one line per error and return EXIT_USAGE; re-raise anything else.

    Trio wraps an error raised inside a nursery in an ExceptionGroup (nested once per nursery), so a
    SetupError from a virtualizer's opener arrives wrapped. A group that holds anything besides SetupErrors
    is a bug, and is re-raised whole, traceback and all."""
    if isinstance(exc, BaseExceptionGroup):
        setup, rest = exc.split(SetupError)
        if setup is None or rest is not None:
            raise exc
        problems = list(_leaves(setup))
    else:
        problems = [exc]
    for problem in problems:
        print(f"launcher: {problem}", file=sys.stderr)
    return EXIT_USAGE


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


# ----------------------------------------------------------------- client verbs


def _start(client: Client, args: argparse.Namespace) -> None:
    path: str = args.file
    body = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    content_type = "application/json" if path.endswith(".json") else "application/yaml"
    _show(args, client.request("POST", "/v1/instances", body, content_type, **_wait(args)), _result_line)


def _stop(client: Client, args: argparse.Namespace) -> None:
    answer = client.request("POST", f"/v1/instances/{args.uuid}/stop", grace=args.grace, **_wait(args))
    _show(args, answer, _result_line)


def _restart(client: Client, args: argparse.Namespace) -> None:
    _show(args, client.request("POST", f"/v1/instances/{args.uuid}/restart", **_wait(args)), _result_line)


def _delete(client: Client, args: argparse.Namespace) -> None:
    answer = client.request("DELETE", f"/v1/instances/{args.uuid}", stop=args.stop, grace=args.grace, **_wait(args))
    _show(args, answer, _result_line)


def _attach(client: Client, args: argparse.Namespace) -> None:
    answer = client.request("POST", f"/v1/instances/{args.uuid}/volumes/{args.volume}", **_wait(args))
    _show(args, answer, _result_line)


def _detach(client: Client, args: argparse.Namespace) -> None:
    answer = client.request("DELETE", f"/v1/instances/{args.uuid}/volumes/{args.volume}", **_wait(args))
    _show(args, answer, _result_line)


def _ls(client: Client, args: argparse.Namespace) -> None:
    _show(args, client.request("GET", "/v1/instances"), lambda a: _instance_table(a["instances"]))


def _show_instance(client: Client, args: argparse.Namespace) -> None:
    _show(args, client.request("GET", f"/v1/instances/{args.uuid}"), _key_values)


def _node(client: Client, args: argparse.Namespace) -> None:
    _show(args, client.request("GET", "/v1/node"), _key_values)


def _stats(client: Client, args: argparse.Namespace) -> None:
    def human(answer: dict[str, Any]) -> str:
        node = {k: v for k, v in answer.items() if k != "instances"}
        return _key_values(node) + "\n\n" + _instance_table(answer.get("instances", []))

    _show(args, client.request("GET", "/v1/stats"), human)


def _evacuate(client: Client, args: argparse.Namespace) -> None:
    _show(args, client.request("POST", "/v1/node/evacuate"), lambda a: f"node is {a['state']}")


def _restore(client: Client, args: argparse.Namespace) -> None:
    _show(args, client.request("POST", "/v1/node/restore"), lambda a: f"node is {a['state']}")


def _events(client: Client, args: argparse.Namespace) -> None:
    for line in _lines(client.stream("/v1/events", since=args.since, follow=args.follow)):
        if args.json:
            print(line, flush=True)
        else:
            print(_event_line(json.loads(line)), flush=True)


def _logs(client: Client, args: argparse.Namespace) -> None:
    for chunk in client.stream(f"/v1/instances/{args.uuid}/log", follow=args.follow):
        sys.stdout.write(chunk.decode(errors="replace"))
        sys.stdout.flush()


def _volumes_ls(client: Client, args: argparse.Namespace) -> None:
    def table(answer: dict[str, Any]) -> str:
        columns = ["id", "size_mb", "allocation_mb", "format", "source_image", "attached_to"]
        rows = [[c.upper() for c in columns]]
        rows += [[str(v[c]) if v[c] not in (None, "") else "-" for c in columns] for v in answer["volumes"]]
        return _table(rows)

    _show(args, client.request("GET", "/v1/volumes"), table)


def _volumes_create(client: Client, args: argparse.Namespace) -> None:
    body = {"id": args.id, "size_mb": args.size_mb, "format": args.format}
    if args.image:
        body.update(source_image=args.image, clone=args.clone)
    answer = client.request("POST", "/v1/volumes", json.dumps(body).encode(), "application/json")
    _show(args, answer, lambda a: f"created {a['id']} ({a['size_mb']} MiB {a['format']})")


def _volumes_show(client: Client, args: argparse.Namespace) -> None:
    _show(args, client.request("GET", f"/v1/volumes/{args.id}"),
          lambda a: "\n".join(f"{key}: {value}" for key, value in a.items()))


def _volumes_resize(client: Client, args: argparse.Namespace) -> None:
    body = json.dumps({"size_mb": args.size_mb}).encode()
    answer = client.request("POST", f"/v1/volumes/{args.id}/resize", body, "application/json")
    _show(args, answer, lambda a: f"resized {a['id']} to {a['size_mb']} MiB")


def _volumes_rm(client: Client, args: argparse.Namespace) -> None:
    _show(args, client.request("DELETE", f"/v1/volumes/{args.id}"), lambda a: f"removed {a['removed']}")


def _images_ls(client: Client, args: argparse.Namespace) -> None:
    def table(answer: dict[str, Any]) -> str:
        columns = ["id", "format", "virtual_size", "size", "in_use", "last_used", "source"]
        rows = [[c.upper() for c in columns]]
        rows += [[_human_size(i[c]) if c.endswith("size") else str(i[c]) for c in columns] for i in answer["images"]]
        return _table(rows)

    _show(args, client.request("GET", "/v1/images"), table)


def _images_import(client: Client, args: argparse.Namespace) -> None:
    """Stream the import's progress; a progress bar on stderr for people, the NDJSON lines with --json."""
    source = args.source
    if "://" not in source:
        source = str(Path(source).absolute())  # the launcher resolves paths itself, from its own cwd
    final: dict[str, Any] = {}
    for line in _lines(client.stream("/v1/images", method="POST", source=source, id=args.id, sha256=args.sha256)):
        if args.json:
            print(line, flush=True)
        answer = json.loads(line)
        if "progress" in answer:
            if not args.json:
                _progress_bar(answer["progress"])
        else:
            final = answer
    if not args.json and sys.stderr.isatty():
        sys.stderr.write("\n")
    if "error" in final:
        raise ClientError(final["error"], final.get("reason", ""))
    if not final:
        raise ClientError("import_interrupted", "the launcher ended the import without an answer")
    if not args.json:
        image = final["image"]
        print(f"{image['id']}: {image['format']}, {_human_size(image['virtual_size'])} virtual, "
              f"sha256 {image['sha256']}{' (verified)' if image['sha256_verified'] else ''}")


def _progress_bar(progress: dict[str, Any]) -> None:
    done, total = progress["done_bytes"], progress["total_bytes"]
    if total:
        filled = int(30 * done / total)
        bar = f"[{'#' * filled}{'.' * (30 - filled)}] {100 * done // total:3d}% of {_human_size(total)}"
    else:
        bar = f"{_human_size(done)}"
    sys.stderr.write(f"\r{progress['image_id']}: {bar}" if sys.stderr.isatty() else f"{progress['image_id']}: {bar}\n")
    sys.stderr.flush()


def _images_rm(client: Client, args: argparse.Namespace) -> None:
    _show(args, client.request("DELETE", f"/v1/images/{args.id}"), lambda a: f"removed {a['removed']}")


def _images_gc(client: Client, args: argparse.Namespace) -> None:
    answer = client.request("POST", "/v1/images/gc", older_than=args.older_than)
    _show(args, answer, lambda a: "removed " + (", ".join(a["removed"]) or "nothing"))


# ----------------------------------------------------------------- output


def _wait(args: argparse.Namespace) -> dict[str, Any]:
    return {"wait": True, "timeout": args.timeout} if args.wait else {}


def _show(args: argparse.Namespace, answer: Any, human: Callable[[Any], str]) -> None:
    print(json.dumps(answer, indent=2) if args.json else human(answer))


def _result_line(answer: dict[str, Any]) -> str:
    pending = "" if answer.get("done", True) else " (in progress)"
    return f"{answer.get('instance_uuid') or 'node'}: {answer.get('state')}{pending}"


def _key_values(answer: dict[str, Any]) -> str:
    width = max((len(k) for k in answer), default=0)
    return "\n".join(f"{k:<{width}}  {json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in answer.items())


def _instance_table(instances: list[dict[str, Any]]) -> str:
    columns = [("UUID", "instance_uuid"), ("STATE", "state"), ("ACTIVITY", "activity"), ("VCPUS", "vcpus"),
               ("MEM_MB", "mem_mb"), ("IMAGE", "image_uuid"), ("CPU%", "cpu_usage"),
               ("MEM_USED", "memory_usage_mb"), ("DISK_USED", "disk_usage_mb")]
    columns = [(title, key) for title, key in columns if not instances or key in instances[0]]
    rows = [[title for title, _ in columns]]
    rows += [["-" if i.get(key) is None else str(i.get(key)) for _, key in columns] for i in instances]
    return _table(rows)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[n]) for row in rows) for n in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _human_size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def _event_line(event: dict[str, Any]) -> str:
    rest = {k: v for k, v in event.items() if k not in ("seq", "time", "type", "instances")}
    if "instances" in event:
        rest["instances"] = len(event["instances"])
    return f"{event['seq']:>8} {event['time']} {event['type']:<15} " + " ".join(f"{k}={v}" for k, v in rest.items())


def _lines(chunks: Iterable[bytes]) -> Iterable[str]:
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            if line:
                yield line.decode()


# ----------------------------------------------------------------- arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launcher", description="Run virtual machines on ciao commands.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    serve = verbs.add_parser("serve", help="run the launcher")
    serve.add_argument("--config", type=Path, help="YAML configuration (default: built-in defaults)")
    serve.add_argument("--data-dir", type=Path)
    serve.add_argument("--virtualizer", metavar="NAME", help="run this one virtualizer only (replaces the config's "
                                                            "virtualizers list)")
    serve.add_argument("--listen", metavar="HOST:PORT")

    reset = verbs.add_parser("hard-reset", help="with the launcher stopped: destroy its VMs, forget every instance")
    reset.add_argument("--config", type=Path, help="YAML configuration (default: built-in defaults)")
    reset.add_argument("--data-dir", type=Path)
    reset.add_argument("--virtualizer", metavar="NAME", help="only this virtualizer's VMs (replaces the config's "
                                                            "virtualizers list)")
    reset.add_argument("--yes", action="store_true", help="really do it")

    def verb(name: str, run: Callable[[Client, argparse.Namespace], None], help_text: str,
             waits: bool = False, group: Any = verbs) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_text)
        p.set_defaults(run=run)
        p.add_argument("--url", help="http://HOST:PORT or unix:///PATH (listen_unix); default: $LAUNCHER_URL, "
                                     "else <data-dir>/api-url")
        p.add_argument("--data-dir", type=Path, help="the launcher's data dir, to find its URL and token")
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        if waits:
            p.add_argument("--wait", action="store_true", help="answer once the command has finished")
            p.add_argument("--timeout", type=float, help="longest wait, seconds")
        return p

    verb("start", _start, "START an instance from a ciao payload (YAML, or JSON if FILE ends in .json; - for stdin)",
         waits=True).add_argument("file", metavar="FILE")
    p = verb("stop", _stop, "STOP an instance", waits=True)
    p.add_argument("uuid")
    p.add_argument("--grace", type=float, help="seconds before a forced power-off")
    verb("restart", _restart, "RESTART an exited instance", waits=True).add_argument("uuid")
    p = verb("delete", _delete, "DELETE an instance (its VM is stopped first)", waits=True)
    p.add_argument("uuid")
    p.add_argument("--stop", action="store_true", help="ciao's stop:true: shut the guest down gracefully first")
    p.add_argument("--grace", type=float, help="seconds before a forced power-off")
    p = verb("attach", _attach, "ATTACH a volume to an instance (hot-plugged if its VM runs)", waits=True)
    p.add_argument("uuid")
    p.add_argument("volume")
    p = verb("detach", _detach, "DETACH a volume from an instance (a running guest must let go of it)", waits=True)
    p.add_argument("uuid")
    p.add_argument("volume")
    verb("ls", _ls, "list instances")
    verb("show", _show_instance, "show one instance").add_argument("uuid")
    verb("node", _node, "node status and resources")
    verb("stats", _stats, "the latest STATS snapshot")
    p = verb("events", _events, "print events")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("--since", type=int, default=0, help="only events after this seq")
    p = verb("logs", _logs, "print an instance's launcher log")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("uuid")
    images = verbs.add_parser("images", help="backing images (qemu): ls | import SRC --id ID | rm ID | gc")
    image_verbs = images.add_subparsers(dest="image_verb", required=True, metavar="IMAGE_VERB")
    verb("ls", _images_ls, "list the backing images", group=image_verbs)
    p = verb("import", _images_import, "import an image (a path on the node, or a file/http/https URL)",
             group=image_verbs)
    p.add_argument("source", metavar="SRC")
    p.add_argument("--id", required=True, help="the image_uuid STARTs will name")
    p.add_argument("--sha256", help="the digest the image must have (else SRC.sha256 if published)")
    p = verb("rm", _images_rm, "remove an image no instance uses", group=image_verbs)
    p.add_argument("id")
    p = verb("gc", _images_gc, "remove unused images not used for a while", group=image_verbs)
    p.add_argument("--older-than", type=float, metavar="SECONDS", help="default: the virtualizer's image_gc_age_s")

    volumes = verbs.add_parser("volumes", help="volumes: ls | create ID --size-mb N | show ID | resize ID N | rm ID")
    volume_verbs = volumes.add_subparsers(dest="volume_verb", required=True, metavar="VOLUME_VERB")
    verb("ls", _volumes_ls, "list the volumes", group=volume_verbs)
    p = verb("create", _volumes_create, "create a volume, blank or from a backing image", group=volume_verbs)
    p.add_argument("id", help="the volume's uuid, as START storage entries and attach_volume name it")
    p.add_argument("--size-mb", type=int, default=0, help="its size (default with --image: the image's)")
    p.add_argument("--format", choices=("qcow2", "raw"), default="qcow2")
    p.add_argument("--image", help="make it from this backing image (bootable)")
    p.add_argument("--clone", choices=("cow", "copy"), default="cow",
                   help="with --image: a copy-on-write child (qcow2) or a full copy")
    p = verb("show", _volumes_show, "show one volume", group=volume_verbs)
    p.add_argument("id")
    p = verb("resize", _volumes_resize, "grow a volume no instance uses", group=volume_verbs)
    p.add_argument("id")
    p.add_argument("size_mb", type=int)
    p = verb("rm", _volumes_rm, "delete a volume no instance uses", group=volume_verbs)
    p.add_argument("id")

    verb("evacuate", _evacuate, "enter maintenance and stop every instance")
    verb("restore", _restore, "leave maintenance")
    fleet_cli.add_parser(verbs)
    return parser


if __name__ == "__main__":
    sys.exit(main())
