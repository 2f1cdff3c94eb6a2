# Figures and tables, made only from runs.csv / curves.csv and the fit JSONs. Tagged for `snakemake --report`.


rule figures:
    input:
        runs=f"{R}/tables/runs.csv",
        curves=f"{R}/tables/curves.csv",
        fits=rules.fit.output.fits,
        optimal=rules.fit.output.optimal,
    output:
        pngs=[
            report(
                f"{R}/figures/{name}.png",
                caption=f"../report/{name}.rst",
                category="Scaling",
            )
            for name in figure_names()
        ],
        pdfs=expand(f"{R}/figures/{{name}}.pdf", name=figure_names()),
    log:
        f"{R}/logs/figures.log",
    conda:
        ENV
    params:
        fit_dir=lambda wc, input: os.path.dirname(input.optimal),
        out=lambda wc, output: os.path.dirname(output.pngs[0]),
        dpi=config["figures"].get("dpi", 200),
    shell:
        "sparsescale figures --runs {input.runs} --curves {input.curves} --fit-dir {params.fit_dir} "
        "--out {params.out} --dpi {params.dpi} > {log} 2>&1"


rule tables:
    input:
        runs=f"{R}/tables/runs.csv",
        fits=rules.fit.output.fits,
        optimal=rules.fit.output.optimal,
    output:
        md=[
            report(
                f"{R}/tables/{name}.md",
                caption=f"../report/{name}.rst",
                category="Tables",
            )
            for name in table_names()
        ],
        tex=expand(f"{R}/tables/{{name}}.tex", name=table_names()),
        csv=expand(f"{R}/tables/{{name}}.csv", name=table_names()),
    log:
        f"{R}/logs/tables.log",
    conda:
        ENV
    params:
        fit_dir=lambda wc, input: os.path.dirname(input.optimal),
        out=lambda wc, output: os.path.dirname(output.md[0]),
    shell:
        "sparsescale tables --runs {input.runs} --fit-dir {params.fit_dir} --out {params.out} > {log} 2>&1"
