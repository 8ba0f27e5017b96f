"""Reading pixels for the models: labelled image folders, band profiles, normalisation."""
