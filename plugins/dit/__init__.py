"""The Calibri plugin: DiT scale parameterisation, exact application, baking and ensembles."""
