"""Developer tools that are not part of the installed package: `tools.compile_check` compiles every
kernel variant the launchers run at GPT-2's shapes for sm_80 and sm_90 on a machine without a GPU.
scripts/ and tests/ import it from the repository root."""
