"""r4b on Kubeflow Pipelines: what sits above the recipe (r4b_core) and knows KFP.

    r4b_kfp.components   the KFP components, thin wrappers around the stages (folder components/)
    r4b_kfp.pipelines    the pipeline, its kfp.local runner and console (folder pipelines/)
    r4b_kfp.cli          the `r4b` command: r4b_core's commands plus `run` and `pipeline`

components/ and pipelines/ stay top-level folders of the repository; r4b_kfp/ links to them so
the packages install under one name and import the same from a checkout as from a wheel.
"""
