"""Print the sampler-correctness table on Gaussian data: eta x steps -> mean and std error, VP and flow.

    python scripts/gaussian_table.py [--chains 4096] [--dim 64]

Each cell is the Monte-Carlo relative error of the samples' mean and std against N(m=1.5, s=0.3), next to the
exact std error of the discretised sampler (float64 variance recursion, no sampling noise).
"""

import argparse

from diffrl.sampling.gaussian import flow_exact_std_error, run_flow_chains, run_vp_chains, vp_exact_std_error

FAMILIES = {
    "VP (gDDIM)": (run_vp_chains, vp_exact_std_error),
    "flow (gDDIM-flow)": (run_flow_chains, flow_exact_std_error),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--etas", default="0,0.5,1,1.2,2")
    parser.add_argument("--steps", default="10,100,1000")
    args = parser.parse_args()
    etas = [float(e) for e in args.etas.split(",")]
    steps = [int(n) for n in args.steps.split(",")]

    for family, (run_chains, exact_std_error) in FAMILIES.items():
        print(f"\n{family}: {args.chains} chains x {args.dim} dims; mean err / std err (MC) [std err exact], %")
        print("| eta | " + " | ".join(f"{n} steps" for n in steps) + " |")
        print("|---" * (len(steps) + 1) + "|")
        for eta in etas:
            cells = []
            for n in steps:
                error = run_chains(eta, n, num_chains=args.chains, dim=args.dim)
                exact = exact_std_error(eta, n)
                cells.append(
                    f"{100 * error.mean_rel_error:+.3f} / {100 * error.std_rel_error:+.2f} [{100 * exact:+.2f}]"
                )
            print(f"| {eta:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
