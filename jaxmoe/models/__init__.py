"""Model families built from `jaxmoe.nn` blocks."""
