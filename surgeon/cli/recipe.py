"""`moe-surgeon recipe export|import`: a session's plan as a mergekit config, and back."""

from __future__ import annotations

import sys

from surgeon.errors import SurgeonError


def cmd_export(args) -> int:
    from surgeon.features.recipe import export_recipe, open_recipe_session
    from surgeon.io.atomic import write_atomic
    from surgeon.io.fs import fs_errors

    session, donors = open_recipe_session(args.session)
    out = export_recipe(session, donors)
    if out.inexpressible and args.strict:
        # nothing written: a recipe that does not reproduce the plan is worse than none under --strict
        more = f" (and {len(out.inexpressible) - 1} more)" if len(out.inexpressible) > 1 else ""
        raise SurgeonError(f"{args.session}: mergekit cannot express {out.inexpressible[0]}{more}; "
                           "nothing written (--strict)")
    if args.out == "-":
        sys.stdout.write(out.text)
    else:
        with fs_errors(args.out, "write the recipe"):
            write_atomic(args.out, out.text.encode())
        print(f"wrote {args.out}: merge_method linear, {len(out.config['models'])} model(s)")
    for note in out.inexpressible:
        print(f"moe-surgeon: warning: not expressible in mergekit: {note}", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    from surgeon.core.session import save_session
    from surgeon.features.recipe import import_recipe

    out = args.out or str(args.recipe).rsplit(".", 1)[0] + ".session.json"
    session = import_recipe(args.recipe, out)
    save_session(session, out)
    plan = session.plan
    print(f"wrote {out}: base {plan.base}, {len(plan.assignments)} assignment(s)"
          + "".join(f"; {a.spec} from {a.donor}" for a in plan.assignments))
    for d in session.donors:
        print(f"  {d.name} {d.path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("recipe", help="mergekit recipes: export a session's plan, import a config as a session")
    rsub = p.add_subparsers(dest="recipe_command", required=True)
    e = rsub.add_parser("export", help="the session's plan as a mergekit 0.1.x config (linear, 0/1 weights)")
    e.add_argument("session")
    e.add_argument("-o", "--out", required=True, metavar="FILE", help="the YAML to write (- for stdout)")
    e.add_argument("--strict", action="store_true",
                   help="fail (exit 2, nothing written) if any part of the plan is not expressible in mergekit")
    e.set_defaults(func=cmd_export)
    i = rsub.add_parser("import", help="a mergekit config that is a component transfer, as a session")
    i.add_argument("recipe")
    i.add_argument("-o", "--out", metavar="FILE", help="the session to write (default: RECIPE.session.json)")
    i.set_defaults(func=cmd_import)
